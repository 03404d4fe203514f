"""Structured output on a real model: 200 generations across 10 JSON schemas (nested objects, arrays, enums, numbers
with bounds) on SmolLM2-135M-Instruct, sampled at temperature 0.8; every one must parse and validate."""

from __future__ import annotations

import json

import pytest

from npulm import assets
from npulm.api import Llama

pytestmark = pytest.mark.slow  # ~10k generated tokens
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

S = {"type": "string", "maxLength": 30}
SCHEMAS = [
    ("a person", {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0,
                                                                         "maximum": 120}},
                  "required": ["name", "age"]}),
    ("a book with its author", {"type": "object", "properties": {
        "title": S, "year": {"type": "integer", "minimum": 1450, "maximum": 2030},
        "author": {"type": "object", "properties": {"first": S, "last": S}, "required": ["first", "last"]}},
        "required": ["title", "year", "author"]}),
    ("a shopping list", {"type": "object", "properties": {
        "items": {"type": "array", "items": S, "minItems": 1, "maxItems": 6}}, "required": ["items"]}),
    ("a traffic light state", {"type": "object", "properties": {
        "color": {"enum": ["red", "amber", "green"]}, "seconds_left": {"type": "integer", "minimum": 0,
                                                                         "maximum": 90}},
        "required": ["color", "seconds_left"]}),
    ("a weather report", {"type": "object", "properties": {
        "city": S, "temperature_c": {"type": "number", "minimum": -60, "maximum": 60},
        "conditions": {"enum": ["sunny", "cloudy", "rain", "snow"]}, "humidity": {"type": "number", "minimum": 0,
                                                                                 "maximum": 1}},
        "required": ["city", "temperature_c", "conditions", "humidity"]}),
    ("an order with line items", {"type": "object", "properties": {
        "order_id": {"type": "integer", "minimum": 1, "maximum": 99999},
        "lines": {"type": "array", "maxItems": 4, "minItems": 1, "items": {"type": "object", "properties": {
            "sku": S, "qty": {"type": "integer", "minimum": 1, "maximum": 10},
            "price": {"type": "number", "minimum": 0, "maximum": 1000}}, "required": ["sku", "qty", "price"]}}},
        "required": ["order_id", "lines"]}),
    ("a yes/no answer with confidence", {"type": "object", "properties": {
        "answer": {"type": "boolean"}, "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["answer", "confidence"]}),
    ("a point in 3D", {"type": "object", "properties": {
        "coords": {"type": "array", "items": {"type": "number", "minimum": -100, "maximum": 100}, "minItems": 3,
                   "maxItems": 3}, "label": S}, "required": ["coords", "label"]}),
    ("a company with departments", {"type": "object", "properties": {
        "company": S, "departments": {"type": "array", "maxItems": 3, "items": {"type": "object", "properties": {
            "name": S, "head": {"type": "object", "properties": {"name": S, "level": {"enum": ["junior", "senior"]}},
                                "required": ["name", "level"]}}, "required": ["name", "head"]}}},
        "required": ["company", "departments"]}),
    ("an event", {"type": "object", "properties": {
        "title": S, "day": {"type": "integer", "minimum": 1, "maximum": 31},
        "month": {"enum": ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]},
        "tags": {"type": "array", "items": {"enum": ["work", "family", "sport", "music"]}, "maxItems": 3},
        "online": {"type": "boolean"}}, "required": ["title", "day", "month", "tags", "online"]}),
]


def test_200_generations_across_10_schemas_parse_and_validate():
    llm = Llama(str(assets.model_path(assets.SMOLLM2)), n_ctx=1024, seed=7, verbose=False)
    failures, runaway = [], []
    for what, schema in SCHEMAS:
        for i in range(20):
            out = llm.create_chat_completion(
                [{"role": "system", "content": "You answer with JSON only."},
                 {"role": "user", "content": f"Give me {what} as JSON."}],
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
                temperature=0.8, seed=i, max_tokens=512)
            text = out["choices"][0]["message"]["content"]
            if out["choices"][0]["finish_reason"] == "length" and text.startswith("{"):
                # sampled at 0.8, a 135M model can write digits without end: llguidance's JSON numbers are
                # unbounded (llama.cpp's schema converter stops them at 16 digits); the reply is then the
                # grammar's unfinished object, cut at max_tokens
                runaway.append((what, i, text[-40:]))
                continue
            try:
                jsonschema.validate(json.loads(text), schema)
                assert out["choices"][0]["finish_reason"] == "stop"
            except (ValueError, AssertionError, jsonschema.ValidationError) as e:
                failures.append((what, i, text[:200], str(e)[:200]))
    assert not failures, f"{len(failures)} of 200 failed: {failures[:3]}"
    assert len(runaway) <= 2, f"{len(runaway)} of 200 ran to max_tokens: {runaway[:3]}"
