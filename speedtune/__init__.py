"""speedtune: fine-tune Llama-3-class models with LoRA/QLoRA and ship them as local models.

The Python API (`speedtune/api.py`: thin doors to the functions the CLI verbs run):

    import speedtune as st
    run = st.train(data="my.jsonl", max_steps=60)
    print(st.generate(run, "Who are you?", temperature=0))
    report = st.export(run, gguf=["q8_0"], ollama=True)

`import speedtune` is instant: torch, transformers and llama.cpp load only when a function needs them."""

__version__ = "0.1.0"

from speedtune.api import Run, _notebook_errors, bench, dataset, export, generate, load, preview, train  # noqa: E402
from speedtune.errors import UserError  # noqa: E402

__all__ = ["load", "generate", "dataset", "preview", "train", "export", "bench", "Run", "UserError"]

_notebook_errors()
