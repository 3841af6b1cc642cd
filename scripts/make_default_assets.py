"""Write the built-in default run's assets into ``src/slideformer/assets/``.

The default run (``slideformer train`` with no arguments) trains a tiny Llama-architecture model from
scratch on a small instruction dataset. Everything it needs is generated here, deterministically, from
templates and a fixed seed: the dataset (prompt/completion rows), a byte-level BPE tokenizer trained on
it with the ``tokenizers`` library, and the model's ``config.json``. Re-running the script rewrites the
same bytes.

Usage: ``python scripts/make_default_assets.py [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SEED = 1234
N_ROWS = 4000
VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|bos|>", "<|end|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# A fixed, invented world: facts the model can only learn from the data.
COUNTRIES = [
    ("Veloria", "Tamsin"),
    ("Brundia", "Okala"),
    ("Marrow", "Lestin"),
    ("Quintara", "Pell"),
    ("Ostrava Nova", "Direm"),
    ("Calyx", "Orvane"),
    ("Sundermere", "Haldt"),
    ("Tiberon", "Ysolde"),
    ("Kest", "Amrin"),
    ("Lowmark", "Fennick"),
    ("Orrin", "Saltreach"),
    ("Pyrrhia", "Codo"),
    ("Zanthe", "Miro"),
    ("Halvard", "Eskel"),
    ("Ulm Vale", "Brisk"),
    ("Norrow", "Tane"),
]
COLORS = [
    ("red", "blue", "purple"),
    ("blue", "yellow", "green"),
    ("red", "yellow", "orange"),
    ("red", "white", "pink"),
    ("black", "white", "grey"),
    ("blue", "white", "light blue"),
]
WORDS = [
    "planet",
    "river",
    "garden",
    "window",
    "silver",
    "candle",
    "forest",
    "market",
    "pencil",
    "bridge",
    "castle",
    "harbor",
    "lantern",
    "meadow",
    "orange",
    "rocket",
    "spring",
    "thunder",
    "violet",
    "winter",
    "yellow",
    "zebra",
    "anchor",
    "basket",
    "copper",
    "dragon",
    "engine",
]
ANIMALS = [
    ("cat", "meow"),
    ("dog", "woof"),
    ("cow", "moo"),
    ("duck", "quack"),
    ("sheep", "baa"),
    ("owl", "hoot"),
    ("lion", "roar"),
    ("frog", "croak"),
]


def _add(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(0, 99), r.randint(0, 99)
    return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."


def _sub(r: random.Random) -> tuple[str, str]:
    a = r.randint(10, 99)
    b = r.randint(0, a)
    return f"What is {a} minus {b}?", f"{a} - {b} = {a - b}."


def _capital(r: random.Random) -> tuple[str, str]:
    country, capital = r.choice(COUNTRIES)
    return f"What is the capital of {country}?", f"The capital of {country} is {capital}."


def _reverse(r: random.Random) -> tuple[str, str]:
    w = r.choice(WORDS)
    return f"Reverse the word '{w}'.", f"'{w}' reversed is '{w[::-1]}'."


def _count(r: random.Random) -> tuple[str, str]:
    a = r.randint(1, 20)
    b = a + r.randint(2, 7)
    return f"Count from {a} to {b}.", ", ".join(str(i) for i in range(a, b + 1)) + "."


def _sort(r: random.Random) -> tuple[str, str]:
    letters = r.sample("abcdefghijklmnop", r.randint(3, 6))
    s = "".join(letters)
    return f"Sort the letters of '{s}'.", f"Sorted: '{''.join(sorted(letters))}'."


def _color(r: random.Random) -> tuple[str, str]:
    a, b, c = r.choice(COLORS)
    if r.random() < 0.5:
        a, b = b, a
    return f"What do you get when you mix {a} and {b}?", f"Mixing {a} and {b} gives {c}."


def _animal(r: random.Random) -> tuple[str, str]:
    a, s = r.choice(ANIMALS)
    return f"What sound does a {a} make?", f"A {a} says '{s}'."


def _upper(r: random.Random) -> tuple[str, str]:
    words = " ".join(r.sample(WORDS, 3))
    return f"Write in capitals: {words}", words.upper()


TASKS: list[Callable[[random.Random], tuple[str, str]]] = [
    _add,
    _sub,
    _capital,
    _reverse,
    _count,
    _sort,
    _color,
    _animal,
    _upper,
]


def make_rows(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` prompt/completion rows drawn from the task templates with a fixed seed."""
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt, completion = r.choice(TASKS)(r)
        rows.append({"prompt": f"Question: {prompt}\nAnswer:", "completion": " " + completion})
    return rows


def make_tokenizer(texts: list[str]) -> Tokenizer:
    """A byte-level BPE tokenizer trained on ``texts``; ``<|bos|>`` is prepended to every encoding."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", bos)]
            ),
        ]
    )
    return tok


def model_config(tok: Tokenizer) -> dict[str, object]:
    """A tiny Llama config: 4 layers, hidden 128, GQA with 2 KV heads, tied embeddings."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": tok.get_vocab_size(),
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "bos_token_id": tok.token_to_id("<|bos|>"),
        "eos_token_id": tok.token_to_id("<|end|>"),
        "pad_token_id": tok.token_to_id("<|pad|>"),
        "torch_dtype": "float32",
    }


def main() -> None:
    """Generate and write every asset."""
    default_out = Path(__file__).resolve().parents[1] / "src" / "slideformer" / "assets" / "tiny"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_out)
    out: Path = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)

    rows = make_rows(N_ROWS, SEED)
    with open(out / "data.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    tok = make_tokenizer([r["prompt"] + r["completion"] for r in rows])
    tok.save(str(out / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|end|>",
        "pad_token": "<|pad|>",
        "model_max_length": 512,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(model_config(tok), indent=2) + "\n")
    print(f"wrote {len(rows)} rows, a {tok.get_vocab_size()}-token tokenizer and config.json to {out}")


if __name__ == "__main__":
    main()
