"""vitopt: trace a Vision Transformer, optimize it as a compiler would, deploy it on a real engine.

    ir = vitopt.trace(model, example)             # torch.export + lift into the encoder IR
    result = vitopt.run_pipeline(ir, "lossless")  # passes
    vitopt.compile(model_or_ir, target="cpu", output="deit.vitopt")
    rt = vitopt.load("deit.vitopt"); rt(images)

Optional engines are imported lazily: `import vitopt` works with none of them installed.
"""
__version__ = "0.1.0"

from vitopt.errors import VitoptError  # noqa: E402


def __getattr__(name):
    # Lazy public API, so `import vitopt` stays cheap and never imports an engine.
    if name == "trace":
        from vitopt.frontend.trace import trace
        return trace
    if name in ("run_pipeline", "Pipeline", "PassResult", "registry", "PRESETS"):
        from vitopt import pipeline
        return getattr(pipeline, name)
    if name == "compile":
        from vitopt.compiler import compile_model
        return compile_model
    if name == "load":
        from vitopt.runtime import load
        return load
    raise AttributeError(f"module 'vitopt' has no attribute {name!r}")


__all__ = ["__version__", "VitoptError", "trace", "run_pipeline", "Pipeline", "PassResult",
           "compile", "load"]
