"""llama-cpp-python's public API (0.3.36) against npulm's, as one table per method: every keyword is implemented,
accepted with one warning (where refusing would break common code and the keyword cannot change a result), or
refused with the reason unless it has llama-cpp-python's default value. Unknown keywords raise TypeError, as Python
does. The README's compatibility table is generated from here (`python -m npulm.compat`)."""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass
from typing import Any

YES, WARN, NO = "supported", "accepted, no effect (one warning)", "refused"


class UnsupportedArgument(ValueError):
    """A llama-cpp-python keyword npulm does not implement, given a value other than its default."""


@dataclass(frozen=True)
class Kw:
    default: Any
    status: str = YES
    note: str = ""


_NOT_GPU = "npulm has no GPU; the NPU layers are set by n_gpu_layers / n_npu_layers"
_ROPE = "RoPE / YaRN overrides are not implemented: the GGUF's values are used"

INIT = {
    "model_path": Kw(None, YES, "a GGUF path or a known model name; None = the default model"),
    "n_gpu_layers": Kw(0, YES, "maps to n_npu_layers (-1 = all) on a board; without an NPU runtime it is ignored "
                               "with a warning, as llama.cpp without GPU support does"),
    "split_mode": Kw(1, NO, _NOT_GPU),
    "main_gpu": Kw(0, NO, _NOT_GPU),
    "tensor_split": Kw(None, NO, _NOT_GPU),
    "rpc_servers": Kw(None, NO, "no RPC backend"),
    "vocab_only": Kw(False, NO, "the weights are always loaded (mmap: tensors not used are never read)"),
    "use_mmap": Kw(True, WARN, "the GGUF is always memory-mapped"),
    "use_mlock": Kw(False, WARN, "pages are not locked"),
    "kv_overrides": Kw(None, NO, "GGUF metadata overrides are not implemented"),
    "seed": Kw(0xFFFFFFFF, YES),
    "n_ctx": Kw(512, YES, "0 = the model's training context"),
    "n_batch": Kw(512, YES),
    "n_ubatch": Kw(512, YES, "the prefill step is min(n_batch, n_ubatch)"),
    "n_threads": Kw(None, YES),
    "n_threads_batch": Kw(None, WARN, "one thread count (n_threads) serves prefill and decode"),
    "rope_scaling_type": Kw(-1, NO, _ROPE),
    "pooling_type": Kw(-1, YES, "-1 = as the GGUF declares; 0 none, 1 mean, 2 cls, 3 last"),
    "attention_type": Kw(-1, NO, "attention is causal, as the model was trained"),
    "rope_freq_base": Kw(0.0, NO, _ROPE),
    "rope_freq_scale": Kw(0.0, NO, _ROPE),
    "yarn_ext_factor": Kw(-1.0, NO, _ROPE),
    "yarn_attn_factor": Kw(1.0, NO, _ROPE),
    "yarn_beta_fast": Kw(32.0, NO, _ROPE),
    "yarn_beta_slow": Kw(1.0, NO, _ROPE),
    "yarn_orig_ctx": Kw(0, NO, _ROPE),
    "logits_all": Kw(False, YES),
    "embedding": Kw(False, YES, "embed() works either way"),
    "offload_kqv": Kw(True, WARN, "the KV cache lives in CPU memory (the NPU API does matmuls only)"),
    "flash_attn": Kw(False, WARN, "attention has one implementation; results do not depend on it"),
    "op_offload": Kw(None, WARN, "placement is per tensor: tensor_overrides"),
    "swa_full": Kw(None, WARN, "sliding-window layers keep the whole context"),
    "no_perf": Kw(False, YES, "npulm prints no performance counters"),
    "last_n_tokens_size": Kw(64, YES, "the repeat / frequency / presence penalty window"),
    "lora_base": Kw(None, NO, "LoRA adapters are not implemented"),
    "lora_scale": Kw(1.0, NO, "LoRA adapters are not implemented"),
    "lora_path": Kw(None, NO, "LoRA adapters are not implemented"),
    "numa": Kw(False, WARN, "no NUMA placement (RK3588 has one memory node)"),
    "chat_format": Kw(None, YES, "a template the GGUF carries, or chatml, chatml-function-calling, gemma, llama-2, "
                                 "llama-3, mistral-instruct, zephyr"),
    "chat_handler": Kw(None, NO, "llama-cpp-python handler objects (multimodal, functionary) are not supported"),
    "draft_model": Kw(None, YES, "speculative decoding: npulm.speculative.LlamaPromptLookupDecoding, a draft GGUF "
                                 "(same vocabulary), an npulm Llama, or a callable input_ids -> draft ids"),
    "tokenizer": Kw(None, NO, "the GGUF's own tokenizer is always used"),
    "type_k": Kw(None, NO, "the KV cache is float16 (llama.cpp's default type)"),
    "type_v": Kw(None, NO, "the KV cache is float16 (llama.cpp's default type)"),
    "spm_infill": Kw(False, NO, "infill (FIM) is not implemented"),
    "verbose": Kw(True, YES),
}

_SAMPLING = {
    "temperature": Kw(0.8, YES, "<= 0: greedy"),
    "top_p": Kw(0.95, YES),
    "min_p": Kw(0.05, YES),
    "typical_p": Kw(1.0, YES),
    "top_k": Kw(40, YES),
    "repeat_penalty": Kw(1.0, YES),
    "frequency_penalty": Kw(0.0, YES),
    "presence_penalty": Kw(0.0, YES),
    "tfs_z": Kw(1.0, NO, "tail-free sampling was removed from llama.cpp"),
    "mirostat_mode": Kw(0, YES),
    "mirostat_tau": Kw(5.0, YES),
    "mirostat_eta": Kw(0.1, YES),
    "seed": Kw(None, YES),
    "logits_processor": Kw(None, YES, "callables (input_ids, logits) -> logits, before the samplers"),
    "grammar": Kw(None, YES, "LlamaGrammar or a GBNF / Lark string (llguidance)"),
    "logit_bias": Kw(None, YES, "-100 bans a token"),
}

COMPLETION = {
    "prompt": Kw(None, YES, "text or token ids"),
    "suffix": Kw(None, NO, "infill (FIM) is not implemented"),
    "max_tokens": Kw(16, YES, "<= 0 or None: until end of generation or a full context"),
    "logprobs": Kw(None, YES, "top-n log-probabilities per token, OpenAI completions shape"),
    "echo": Kw(False, YES),
    "stop": Kw([], YES),
    "stream": Kw(False, YES),
    "model": Kw(None, YES, "the name reported in the response"),
    "stopping_criteria": Kw(None, YES, "callables (input_ids, logits) -> bool"),
    **_SAMPLING,
}

CHAT = {
    "messages": Kw(None, YES),
    "functions": Kw(None, YES, "legacy form of tools"),
    "function_call": Kw(None, YES, "legacy form of tool_choice"),
    "tools": Kw(None, YES, "through the GGUF's chat template; calls parsed to OpenAI tool_calls"),
    "tool_choice": Kw(None, YES, "auto / none / required / a named function (required and named: grammar)"),
    "stream": Kw(False, YES),
    "stop": Kw([], YES),
    "response_format": Kw(None, YES, "text / json_object / json_schema (grammar)"),
    "max_tokens": Kw(None, YES),
    "model": Kw(None, YES, "the name reported in the response"),
    "logprobs": Kw(None, YES, "OpenAI chat shape"),
    "top_logprobs": Kw(None, YES),
    **{**_SAMPLING, "temperature": Kw(0.2, YES, "<= 0: greedy")},
}

EMBED = {
    "input": Kw(None, YES, "a string or a list of strings"),
    "normalize": Kw(False, YES),
    "truncate": Kw(True, YES),
    "return_count": Kw(False, YES),
}

METHODS = {  # llama-cpp-python's public Llama methods and properties
    "__call__ / create_completion": (YES, "see the keyword table"),
    "create_chat_completion": (YES, "see the keyword table"),
    "create_chat_completion_openai_v1": (NO, "returns openai package objects: build them from the dict"),
    "create_embedding / embed": (YES, "pooling as the GGUF declares (pooling_type overrides)"),
    "tokenize / detokenize": (YES, ""),
    "tokenizer()": (NO, "`llm.tokenizer` is npulm's Tokenizer object (encode / decode), not a method"),
    "eval / scores / n_tokens / input_ids": (YES, ""),
    "eval_tokens / eval_logits": (YES, ""),
    "generate / sample": (YES, "the same sampler chain as the completions"),
    "reset": (YES, ""),
    "save_state / load_state": (YES, "KV cache, tokens, scores and the seed generator's state"),
    "set_seed": (YES, ""),
    "set_cache": (NO, "npulm keeps the last sequence and reuses its longest common prefix by itself"),
    "close / context manager": (YES, ""),
    "n_ctx / n_vocab / n_embd / token_bos / token_eos / token_nl / pooling_type / metadata": (YES, ""),
    "logits_to_logprobs / longest_token_prefix": (YES, ""),
    "from_pretrained": (YES, "resolves package-shipped models and the local cache by name; no model hub"),
    "ctx / model / _ctx / _model (llama.cpp handles)": (NO, "no llama.cpp handles: npulm runs its own engine"),
}

# llama-cpp-python's chat_format names npulm knows, as Jinja (chatml and gemma come from npulm.chat); written after
# each family's published format. Other names are refused: a template the GGUF carries is the better choice anyway.
CHAT_FORMATS = {
    "llama-2": "{% set ns = namespace(sys='') %}{% for m in messages %}{% if m['role'] == 'system' %}"
               "{% set ns.sys = m['content'] %}{% endif %}{% endfor %}"
               "{% for m in messages if m['role'] != 'system' %}{% if m['role'] == 'user' %}"
               "{{ bos_token + '[INST] ' }}{% if loop.first and ns.sys %}"
               "{{ '<<SYS>>\n' + ns.sys + '\n<</SYS>>\n\n' }}{% endif %}{{ m['content'] + ' [/INST]' }}"
               "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}",
    "llama-3": "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
               " + m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    "mistral-instruct": "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                        "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% elif m['role'] == 'assistant' %}"
                        "{{ m['content'] + eos_token }}{% endif %}{% endfor %}",
    "zephyr": "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}",
}

_warned: set[str] = set()


def check(method: str, table: dict[str, Kw], given: dict[str, Any]) -> None:
    """Refuse what `given` (the keywords a method received beyond those it implements) cannot honour: unknown
    names raise TypeError, refused ones with a non-default value UnsupportedArgument; WARN ones warn once."""
    for name, value in given.items():
        kw = table.get(name)
        if kw is None:
            close = difflib.get_close_matches(name, list(table), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"{method}() got an unexpected keyword argument {name!r}{hint}")
        if kw.status == YES or _same(value, kw.default):
            continue
        if kw.status == NO:
            raise UnsupportedArgument(f"{method}(): {name}={value!r} is not supported by npulm: {kw.note}")
        if name not in _warned:
            _warned.add(name)
            warnings.warn(f"{method}(): {name}={value!r} has no effect in npulm: {kw.note}", stacklevel=3)


def _same(value: Any, default: Any) -> bool:
    return value is None or value == default or (default == [] and not value)


def markdown() -> str:
    """The README's table: methods, then each method's keywords that are not plainly supported."""
    lines = ["| llama-cpp-python | npulm | note |", "|---|---|---|"]
    lines += [f"| `{name}` | {status} | {note} |" for name, (status, note) in METHODS.items()]
    for method, table in (("Llama()", INIT), ("create_completion", COMPLETION), ("create_chat_completion", CHAT),
                          ("embed", EMBED)):
        for name, kw in table.items():
            lines.append(f"| `{method}` `{name}` | {kw.status} | {kw.note} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
