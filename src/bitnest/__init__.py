"""bitnest: quantize Hugging Face causal LMs (Matryoshka int8/int4/int2, OneBit, the classic toolbox), measure
what it cost, and run the packed model faster than the original."""
import os as _os

# torch's CPU wheels run MKL on Intel OpenMP, whose threads spin for 200 ms after every MKL call (KMP_BLOCKTIME)
# and so take both cores from the packed kernels that run next (measured: a 4096×4096 int4 layer after an fp32
# F.linear ran 1.8× slower). Read when MKL first starts its threads: set before any MKL call, unless the user
# chose a value.
_os.environ.setdefault("KMP_BLOCKTIME", "0")

__version__ = "0.2.0"


def _register_with_transformers() -> None:
    """`AutoModelForCausalLM.from_pretrained(bitnest_checkpoint)` works once bitnest is imported (integrations.hf).

    transformers' quantizer registry costs seconds to import, so it is not imported here: the registration runs
    right after transformers itself imports `transformers.quantizers.auto` (a post-import hook), or now when that
    already happened."""
    import importlib.abc
    import importlib.util
    import sys

    target = "transformers.quantizers.auto"

    def register():
        try:
            from .integrations.hf import register as reg
        except ImportError:  # transformers too old for custom quantizers: bitnest's own loader still works
            return
        reg()

    if target in sys.modules:
        register()
        return

    class _AfterImport(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target_=None):
            if fullname != target:
                return None
            sys.meta_path.remove(self)  # once; and let the real finders resolve the module
            spec = importlib.util.find_spec(fullname)
            loader = getattr(spec, "loader", None)
            if loader is None or not hasattr(loader, "exec_module"):
                return spec
            run = loader.exec_module

            def exec_module(module):
                run(module)
                register()

            loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _AfterImport())


_register_with_transformers()


def __getattr__(name):
    if name == "BitnestConfig":
        from .integrations.hf import BitnestConfig
        return BitnestConfig
    raise AttributeError(f"module 'bitnest' has no attribute {name!r}")
