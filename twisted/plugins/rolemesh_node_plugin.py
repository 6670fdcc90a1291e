# The twistd plugin: `twistd rolemesh-node --config PATH`. Kept to one line of
# substance, importing nothing heavy: an import error here would only make the
# subcommand silently disappear from `twistd --help`.
from twisted.application.service import ServiceMaker

rolemesh_node = ServiceMaker(
    "RoleMesh Node Agent",
    "rolemesh_node.tap",
    "Supervise one llama-server per device and proxy OpenAI-compatible requests to them.",
    "rolemesh-node",
)
