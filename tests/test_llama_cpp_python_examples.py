# ruff: noqa: E501  (the examples are verbatim, long lines included)
"""llama-cpp-python's own README examples (0.3.36) and a typical JSON-extraction / tool-calling script, run as written
but for the import (`from npulm import Llama`) and the model path, on SmolLM2-135M-Instruct."""

from __future__ import annotations

import json

import pytest

from npulm import assets

pytestmark = pytest.mark.slow  # SmolLM2 generations: seconds each on an idle machine
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")


@pytest.fixture(scope="module")
def model() -> str:
    return str(assets.model_path(assets.SMOLLM2))


def run(source: str, model: str) -> dict:
    scope = {"MODEL": model}
    exec(compile(source, "<example>", "exec"), scope)
    return scope


COMPLETION = '''
from npulm import Llama

llm = Llama(
      model_path=MODEL,
      # n_gpu_layers=-1, # Uncomment to use GPU acceleration
      # seed=1337, # Uncomment to set a specific seed
      # n_ctx=2048, # Uncomment to increase the context window
)
output = llm(
      "Q: Name the planets in the solar system? A: ", # Prompt
      max_tokens=32, # Generate up to 32 tokens, set to None to generate up to the end of the context window
      stop=["Q:", "\\n"], # Stop generating just before the model would generate a new question
      echo=True # Echo the prompt back in the output
) # Generate a completion, can also call create_completion
print(output)
'''

FROM_PRETRAINED = '''
from npulm import Llama
llm = Llama.from_pretrained(
    repo_id="HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
    filename="*Q4_1.gguf",
    verbose=False
)
'''

CHAT_FORMAT = '''
from npulm import Llama
llm = Llama(
      model_path=MODEL,
      chat_format="llama-2"
)
out = llm.create_chat_completion(
      messages = [
          {"role": "system", "content": "You are an assistant who perfectly describes images."},
          {
              "role": "user",
              "content": "Describe this image in detail please."
          }
      ]
)
'''

JSON_MODE = '''
from npulm import Llama
llm = Llama(model_path=MODEL, chat_format="chatml")
out = llm.create_chat_completion(
    messages=[
        {
            "role": "system",
            "content": "You are a helpful assistant that outputs in JSON.",
        },
        {"role": "user", "content": "Who won the world series in 2020"},
    ],
    response_format={
        "type": "json_object",
    },
    temperature=0.7,
)
'''

JSON_SCHEMA_MODE = '''
from npulm import Llama
llm = Llama(model_path=MODEL, chat_format="chatml")
out = llm.create_chat_completion(
    messages=[
        {
            "role": "system",
            "content": "You are a helpful assistant that outputs in JSON.",
        },
        {"role": "user", "content": "Who won the world series in 2020"},
    ],
    response_format={
        "type": "json_object",
        "schema": {
            "type": "object",
            "properties": {"team_name": {"type": "string"}},
            "required": ["team_name"],
        },
    },
    temperature=0.7,
)
'''

FUNCTION_CALLING = '''
from npulm import Llama
llm = Llama(model_path=MODEL, chat_format="chatml-function-calling")
out = llm.create_chat_completion(
      messages = [
        {
          "role": "system",
          "content": "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions. The assistant calls functions with appropriate input when necessary"

        },
        {
          "role": "user",
          "content": "Extract Jason is 25 years old"
        }
      ],
      tools=[{
        "type": "function",
        "function": {
          "name": "UserDetail",
          "parameters": {
            "type": "object",
            "title": "UserDetail",
            "properties": {
              "name": {
                "title": "Name",
                "type": "string"
              },
              "age": {
                "title": "Age",
                "type": "integer"
              }
            },
            "required": [ "name", "age" ]
          }
        }
      }],
      tool_choice={
        "type": "function",
        "function": {
          "name": "UserDetail"
        }
      }
)
'''

EMBEDDINGS = '''
import npulm as llama_cpp

llm = llama_cpp.Llama(model_path=MODEL, embedding=True)

embeddings = llm.create_embedding("Hello, world!")

# or create multiple embeddings at once

embeddings = llm.create_embedding(["Hello, world!", "Goodbye, world!"])
'''


def test_readme_completion(model, capsys):
    out = run(COMPLETION, model)["output"]
    choice = out["choices"][0]
    assert choice["text"].startswith("Q: Name the planets in the solar system? A: ")
    assert "\n" not in choice["text"] and choice["finish_reason"] in ("stop", "length")
    assert out["usage"]["completion_tokens"] <= 32 and "text_completion" in capsys.readouterr().out


def test_readme_from_pretrained_and_chat_format(model):
    assert run(FROM_PRETRAINED, model)["llm"].model_path == model
    out = run(CHAT_FORMAT, model)["out"]
    assert out["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("source", [JSON_MODE, JSON_SCHEMA_MODE])
def test_readme_json_mode(model, source):
    out = run(source, model)["out"]
    choice = out["choices"][0]
    if choice["finish_reason"] == "length":
        # the example samples (temperature 0.7, no seed, no max_tokens): a 135M model can loop inside the JSON until
        # the context is full, as llama-cpp-python does; the text is then the grammar's unfinished object
        # (tests/test_structured_output.py checks 200 seeded, bounded generations parse and validate)
        assert choice["message"]["content"].startswith("{")
        return
    data = json.loads(choice["message"]["content"])
    assert isinstance(data, dict)
    if source is JSON_SCHEMA_MODE:
        assert isinstance(data["team_name"], str)


def test_readme_function_calling(model):
    out = run(FUNCTION_CALLING, model)["out"]
    call = out["choices"][0]["message"]["tool_calls"][0]["function"]
    args = json.loads(call["arguments"])
    assert call["name"] == "UserDetail" and isinstance(args["name"], str) and isinstance(args["age"], int)


def test_readme_embeddings(model):
    out = run(EMBEDDINGS, model)["embeddings"]
    assert len(out["data"]) == 2 and out["usage"]["prompt_tokens"] > 0


EXTRACTION_AND_TOOLS = '''
import json
from npulm import Llama

llm = Llama(model_path=MODEL, n_ctx=2048, seed=42, verbose=False)

# 1. structured extraction
schema = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string"},
        "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
    },
    "required": ["name", "age", "city", "hobbies"],
}
text = "Maria is 34, lives in Lisbon and loves surfing and chess."
resp = llm.create_chat_completion(
    messages=[{"role": "system", "content": "Extract the person as JSON."},
              {"role": "user", "content": text}],
    response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    temperature=0.2,
    max_tokens=200,
)
person = json.loads(resp["choices"][0]["message"]["content"])

# 2. an agent loop with one tool
def get_weather(city):
    return {"city": city, "temperature_c": 21}

tools = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
messages = [{"role": "user", "content": "What's the weather in Lisbon?"}]
resp = llm.create_chat_completion(messages=messages, tools=tools, tool_choice="required", max_tokens=100)
msg = resp["choices"][0]["message"]
messages.append(msg)
for call in msg["tool_calls"]:
    result = get_weather(**json.loads(call["function"]["arguments"]))
    messages.append({"role": "tool", "tool_call_id": call["id"], "content": json.dumps(result)})
final = llm.create_chat_completion(messages=messages, tools=tools, max_tokens=40)
answer = final["choices"][0]["message"]["content"]
'''


def test_json_extraction_and_tool_calling_script(model):
    scope = run(EXTRACTION_AND_TOOLS, model)
    jsonschema.validate(scope["person"], scope["schema"])
    assert scope["messages"][-1]["role"] == "tool" and json.loads(scope["messages"][-1]["content"])["city"]
    assert isinstance(scope["answer"], str) or scope["final"]["choices"][0]["message"].get("tool_calls")
