"""AvatarForcing streaming runtime: `from runtime import AvatarPipeline, ModelConfig, StreamConfig`."""
from .config import ModelConfig, StreamConfig

__all__ = ["AvatarPipeline", "ModelConfig", "StreamConfig"]


def __getattr__(name):
    # The pipeline pulls in torch models and media I/O; import it on first use so that
    # `runtime.config` stays cheap for tools that only read configs.
    if name == "AvatarPipeline":
        from .pipeline import AvatarPipeline
        return AvatarPipeline
    raise AttributeError(name)
