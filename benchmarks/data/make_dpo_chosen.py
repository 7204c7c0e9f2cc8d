"""Writes dpo-en-demo-chosen-{train,eval}.jsonl from LLaMA-Factory's dpo_en_demo.json (Apache-2.0): each row's
prompt turns with its chosen answer as one chat row (`messages`: system/user/assistant), 30 rows held out at random
(seed 0) for the eval loss.

    python benchmarks/data/make_dpo_chosen.py ../shared/data/dpo_en_demo.json
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


def convert(rows: list[dict]) -> list[dict]:
    return [{"messages": [{"role": ROLES[t["from"]], "content": t["value"]} for t in r["conversations"]]
             + [{"role": "assistant", "content": r["chosen"]["value"]}]} for r in rows]


def main(source: str, held_out: int = 30) -> None:
    rows = convert(json.loads(Path(source).read_text(encoding="utf-8")))
    held = set(random.Random(0).sample(range(len(rows)), held_out))
    here = Path(__file__).parent
    for name, part in (("train", [r for i, r in enumerate(rows) if i not in held]),
                       ("eval", [r for i, r in enumerate(rows) if i in held])):
        path = here / f"dpo-en-demo-chosen-{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
        print(f"{path}: {len(part)} rows")


if __name__ == "__main__":
    main(sys.argv[1])
