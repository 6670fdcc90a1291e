"""Placement policy: a pure function over device views."""

import pytest

from rolemesh_node.scheduler import AllBusy, NoDevice, SlotView, place

GB = 1024**3


def view(dev, index, *, model=None, serving=None, in_flight=0, waiting=0, max_pending=2,
         free=None, loaded=None, cooldown=()):
    return SlotView(device_id=dev, index=index, model=model,
                    serving=(model is not None) if serving is None else serving,
                    in_flight=in_flight, waiting=waiting, max_pending=max_pending,
                    free_memory_bytes=free, loaded_model_bytes=loaded,
                    cooldown_models=frozenset(cooldown))


CASES = [
    ("loaded device first, even with less free memory",
     "m", None, [view("cuda:0", 0, free=20 * GB), view("cuda:1", 1, model="m", free=2 * GB)], "cuda:1"),
    ("loaded but full queue -> another device",
     "m", None, [view("cuda:0", 0, free=20 * GB), view("cuda:1", 1, model="m", in_flight=1, waiting=1)], "cuda:0"),
    ("among loaded ones, least pressure",
     "m", None, [view("cuda:0", 0, model="m", in_flight=1), view("cuda:1", 1, model="m")], "cuda:1"),
    ("otherwise most free memory",
     "m", None, [view("cuda:0", 0, free=4 * GB), view("cuda:1", 1, free=8 * GB)], "cuda:1"),
    ("free memory tie -> least pressure",
     "m", None, [view("cuda:0", 0, free=8 * GB, model="x", in_flight=1), view("cuda:1", 1, free=8 * GB, model="y")],
     "cuda:1"),
    ("tie on memory and pressure -> a device with nothing loaded",
     "m", None, [view("cpu:0", 0, free=8 * GB, model="x"), view("cpu:1", 1, free=8 * GB)], "cpu:1"),
    ("all equal -> lowest index",
     "m", None, [view("cpu:1", 1), view("cpu:0", 0)], "cpu:0"),
    ("does not fit -> skipped",
     "m", 6 * GB, [view("cuda:0", 0, free=4 * GB), view("cuda:1", 1, free=3 * GB, model="big", loaded=5 * GB)],
     "cuda:1"),
    ("unknown free memory is not a reason to skip",
     "m", 6 * GB, [view("cuda:0", 0, free=None)], "cuda:0"),
    ("cooldown -> skipped",
     "m", None, [view("cuda:0", 0, free=20 * GB, cooldown=["m"]), view("cuda:1", 1, free=1 * GB)], "cuda:1"),
    ("a starting child counts as loaded",
     "m", None, [view("cuda:0", 0, free=20 * GB), view("cuda:1", 1, model="m", serving=True, in_flight=1)],
     "cuda:1"),
    ("a crashed child holding the model name is not preferred",
     "m", None, [view("cuda:0", 0, free=20 * GB), view("cuda:1", 1, model="m", serving=False, free=2 * GB)],
     "cuda:0"),
]


@pytest.mark.parametrize("why, model, size, views, expected", CASES, ids=[c[0] for c in CASES])
def test_place(why, model, size, views, expected):
    assert place(model, size, views) == expected


def test_all_busy_when_every_able_device_is_full():
    views = [view("cpu:0", 0, in_flight=1, waiting=1), view("cpu:1", 1, model="m", in_flight=2)]
    with pytest.raises(AllBusy) as info:
        place("m", None, views)
    assert info.value.devices == ["cpu:0", "cpu:1"]


def test_no_device_names_every_reason():
    views = [view("cuda:0", 0, cooldown=["m"]), view("cuda:1", 1, free=1 * GB)]
    with pytest.raises(NoDevice) as info:
        place("m", 2 * GB, views)
    assert set(info.value.reasons) == {"cuda:0", "cuda:1"}
    assert "cooldown" in str(info.value) and "free" in str(info.value)


def test_no_devices_at_all():
    with pytest.raises(NoDevice):
        place("m", None, [])
