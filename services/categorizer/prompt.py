"""What the `openai` backend asks the LLM, and the JSON schema its answer must follow.

The schema's label fields are an enum of the taxonomy, so a server with structured output (vLLM's
`response_format` json_schema, llama.cpp's json_object + schema) can only produce answers that parse
and stay on the list; without it the prompt asks for the same JSON and the answer is checked. Bump
PROMPT_VERSION whenever the prompt, the examples or the schema change: it is part of the cache key."""

from __future__ import annotations

import json

from latent_verbalizer.services.categorizer.models import MAX_LABELS
from latent_verbalizer.shared.taxonomy import UNKNOWN, Taxonomy

PROMPT_VERSION = "2"

_INSTRUCTIONS = """You label the phrases of image captions with kinds of visual information.
Captions come from a captioning model reading intermediate layers of a vision network, so many are
word salad: repeated words, fragments and made-up words.

Split the caption into its phrases, in order, covering all of its words: a noun phrase with its
determiner and preposition ("at a table", "a dirt path"), a verb ("riding", "is standing"), a
spatial expression ("next to", "in front of"), or a single word where the words do not form
phrases. Keep repeated words and phrases: every occurrence is its own phrase. Leave out punctuation.

Give each phrase one to three labels from this list, the most fitting first:
{labels}

Use {unknown} for made-up words, fragments and words that carry no visual information
("and", "the", "zuzuflying"). Use only labels from the list.
Answer with JSON only: {{"phrases": [{{"text": <phrase>, "labels": [<label>, ...]}}, ...]}}."""

_EXAMPLES = [
    (
        "a woman holding an umbrella next to a red bus .",
        [
            ("a woman", ["person", "female"]),
            ("holding", ["actions"]),
            ("an umbrella", ["object"]),
            ("next to", ["position"]),
            ("a red bus", ["color", "vehicle"]),
        ],
    ),
    (
        "blue blue green - kabrodolling blue and",
        [
            ("blue", ["color"]),
            ("blue", ["color"]),
            ("green", ["color"]),
            ("kabrodolling", [UNKNOWN]),
            ("blue", ["color"]),
            ("and", [UNKNOWN]),
        ],
    ),
    (
        "two small dogs playing in the snow at night",
        [
            ("two small dogs", ["animal", "numbers", "size"]),
            ("playing", ["actions"]),
            ("in the snow", ["weather", "nature"]),
            ("at night", ["time"]),
        ],
    ),
]


def system_prompt(taxonomy: Taxonomy) -> str:
    return _INSTRUCTIONS.format(labels=", ".join(taxonomy.labels), unknown=UNKNOWN)


def caption_messages(caption: str, taxonomy: Taxonomy) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt(taxonomy)}]
    for example, phrases in _EXAMPLES:
        answer = {"phrases": [{"text": text, "labels": labels} for text, labels in phrases]}
        messages += [
            {"role": "user", "content": f"Caption: {example}"},
            {"role": "assistant", "content": json.dumps(answer)},
        ]
    return [*messages, {"role": "user", "content": f"Caption: {caption}"}]


def phrase_messages(phrase: str, taxonomy: Taxonomy) -> list[dict[str, str]]:
    """One phrase, labelled as a whole (no splitting)."""
    instructions = system_prompt(taxonomy) + "\n\nThis time the phrase is given: label it as a whole."
    instructions += ' Answer with JSON only: {"labels": [<label>, ...]}.'
    return [{"role": "system", "content": instructions}, {"role": "user", "content": f"Phrase: {phrase}"}]


def _labels_schema(taxonomy: Taxonomy) -> dict:
    return {
        "type": "array",
        "items": {"type": "string", "enum": taxonomy.labels},
        "minItems": 1,
        "maxItems": MAX_LABELS,
    }


def caption_schema(taxonomy: Taxonomy) -> dict:
    phrase = {
        "type": "object",
        "properties": {"text": {"type": "string"}, "labels": _labels_schema(taxonomy)},
        "required": ["text", "labels"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"phrases": {"type": "array", "items": phrase}},
        "required": ["phrases"],
        "additionalProperties": False,
    }


def phrase_schema(taxonomy: Taxonomy) -> dict:
    return {
        "type": "object",
        "properties": {"labels": _labels_schema(taxonomy)},
        "required": ["labels"],
        "additionalProperties": False,
    }


def response_format(dialect: str, name: str, schema: dict) -> dict | None:
    """The request's `response_format` in a server's structured-output dialect (docs/llm_servers.md):
    json_schema (OpenAI; vLLM, SGLang and Ollama turn it into constrained decoding), json_object with
    the schema beside it (llama.cpp / llama-cpp-python), or none (the prompt alone asks for JSON)."""
    if dialect == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": name, "strict": True, "schema": schema}}
    if dialect == "json_object":
        return {"type": "json_object", "schema": schema}
    if dialect == "none":
        return None
    raise ValueError(f"unknown structured-output dialect {dialect!r} (json_schema | json_object | none)")


def repair_messages(answer: str, problem: str) -> list[dict[str, str]]:
    """What follows an unusable answer (from a server without structured output) to ask once more."""
    return [
        {"role": "assistant", "content": answer},
        {"role": "user", "content": f"That answer is not usable ({problem}). Answer again with the JSON only,"
                                    " in the format asked for, with labels from the list."},
    ]
