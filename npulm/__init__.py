"""npulm: run GGUF LLMs on Rockchip NPUs. Data path: GGUF -> weights -> placement -> forward -> sampler -> API."""

__version__ = "0.1.0"


def __getattr__(name: str):  # keep `import npulm` light; Llama pulls in numpy, tokenizers, jinja2
    if name == "Llama":
        from .api import Llama

        return Llama
    if name == "LlamaGrammar":
        from .grammar import LlamaGrammar

        return LlamaGrammar
    raise AttributeError(name)
