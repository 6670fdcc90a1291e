"""RoleMesh Node Agent: one supervised llama-server per accelerator behind an OpenAI-compatible proxy."""

__version__ = "0.1.0"
