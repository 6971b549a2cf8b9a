"""The lmms-eval bridge: our entry point resolves in lmms-eval's model registry, and a tiny llada-v
(briefly trained, reduced config) from our cache is scored by lmms-eval's own mmmu_val on a tiny local
MMMU-format parquet, offline; the result lands in a record with lmms-eval's version, task config and seeds."""
from __future__ import annotations

import io
import json
import re
import sys
import tomllib
from pathlib import Path

import pytest

lmms_eval = pytest.importorskip("lmms_eval", reason="optional extra: pip install --no-deps lmms-eval==0.7.3 (docs/datasets.md)")

ROOT = Path(__file__).resolve().parents[1]
SMALL_MODEL = dict(enc_dim=32, enc_layers=2, enc_heads=2, d_model=48, n_layers=2, n_heads=2, mlp_hidden=96,
                   mim_epochs=1, base_epochs=1)
SMALL_TASK = dict(n_base=60, n_pool=30, n_test=8, n_mc=8, n_encoder=40)


def _png(color) -> dict:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def write_mmmu_parquet(path: Path, n: int = 6) -> Path:
    """MMMU's published validation shape (MMMU/MMMU, one parquet per subject): id, question, options (a
    Python-literal list), explanation, image_1..image_7 (HF Image features), img_type, answer (a letter),
    topic_difficulty, question_type, subfield — written by datasets, as the published files are."""
    import datasets
    feats = datasets.Features({"id": datasets.Value("string"), "question": datasets.Value("string"),
                               "options": datasets.Value("string"), "explanation": datasets.Value("string"),
                               **{f"image_{k}": datasets.Image() for k in range(1, 8)},
                               "img_type": datasets.Value("string"), "answer": datasets.Value("string"),
                               "topic_difficulty": datasets.Value("string"), "question_type": datasets.Value("string"),
                               "subfield": datasets.Value("string")})
    colors = {"red": (220, 20, 20), "green": (20, 160, 30), "blue": (30, 40, 220), "yellow": (240, 220, 20)}
    rows = []
    for i in range(n):
        c = list(colors)[i % 4]
        rows.append({"id": f"validation_Art_{i + 1}", "question": f"<image 1> What color is the object?",
                     "options": str(list(colors)), "explanation": "", "image_1": _png(colors[c]),
                     **{f"image_{k}": None for k in range(2, 8)}, "img_type": "['Photographs']",
                     "answer": "ABCD"[i % 4], "topic_difficulty": "Easy", "question_type": "multiple-choice",
                     "subfield": "Art"})
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=feats).to_parquet(str(path))
    return path


@pytest.fixture
def entry_point_installed(tmp_path, monkeypatch):
    """A dist-info carrying exactly the entry points our pyproject declares, on sys.path (what
    `pip install` of this package writes), so lmms-eval finds the bridge the way it finds any plugin."""
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lmms_eval.models"]
    dist = tmp_path / "site" / "vl_backdoor_bench_ep-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vl-backdoor-bench-ep\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("[lmms_eval.models]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return eps


def test_entry_point_resolves_to_the_bridge(entry_point_installed):
    from importlib.metadata import entry_points

    from lmms_eval.models import MODEL_REGISTRY_V2, get_model

    from bench.lmms import MODEL_ID, BenchVictim
    assert MODEL_ID in entry_point_installed
    assert MODEL_ID in [ep.name for ep in entry_points(group="lmms_eval.models")]
    MODEL_REGISTRY_V2.load_entrypoint_manifests(overwrite=True)
    assert get_model(MODEL_ID) is BenchVictim and BenchVictim.is_simple


def test_local_task_includes_the_stock_task(tmp_path):
    from bench.lmms import local_task
    from core.errors import BenchError
    pq = write_mmmu_parquet(tmp_path / "mmmu" / "validation-00000-of-00001.parquet", n=2)
    name, path, split = local_task("mmmu_val", [pq], tmp_path / "tasks")
    text = path.read_text()
    assert name == "mmmu_val_local" and split == "validation"
    assert re.search(r"^include: .*lmms_eval/tasks/mmmu/mmmu_val\.yaml$", text, re.M)
    assert "dataset_path: parquet" in text and str(pq.resolve()) in text
    with pytest.raises(BenchError, match="missing file"):
        local_task("mmmu_val", [tmp_path / "nope.parquet"], tmp_path / "tasks")
    with pytest.raises(BenchError, match="has no task 'no_such_task'"):
        local_task("no_such_task", [pq], tmp_path / "tasks")


@pytest.mark.slow
def test_mmmu_val_scores_a_cached_tiny_victim_into_a_record(tmp_path, monkeypatch, entry_point_installed, one_thread):
    from lmms_eval.models import MODEL_REGISTRY_V2

    from bench.cache import ArtifactCache
    from bench.lmms import RESULTS_FILE, load_victim, score
    from bench.pipeline import Cell, make_spec
    from core.errors import BenchError
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    MODEL_REGISTRY_V2.load_entrypoint_manifests(overwrite=True)      # the bridge through its entry point
    spec = make_spec(defense="none", model_args=SMALL_MODEL, task_args=SMALL_TASK, recipe={"epochs": 1})
    cache = ArtifactCache(tmp_path / "cache")
    with pytest.raises(BenchError, match="not in the cache.*run `bench run`"):
        load_victim(spec, "clean", cache.root)                       # never trains behind the harness
    Cell(spec, cache, log=lambda m: None).clean()                   # base + clean fine-tune, cached
    pq = write_mmmu_parquet(tmp_path / "mmmu" / "Art" / "validation-00000-of-00001.parquet", n=6)
    lmms_decoding = {"gen_length": 8, "steps": 8, "block_length": 8}     # lmms-eval's requests only
    rec = score(spec, "clean", "mmmu_val", [pq], tmp_path / "results", cache.root, model_args=lmms_decoding,
                log=lambda m: None)
    stored = [json.loads(x) for x in (tmp_path / "results" / RESULTS_FILE).read_text().splitlines()]
    assert len(stored) == 1 and stored[0]["row"] == "clean" and stored[0]["spec"] == spec.to_dict()
    lm = stored[0]["lmms_eval"]
    assert lm["version"] == "0.7.3" and lm["task"] == "mmmu_val" and lm["n_samples"]["effective"] == 6
    assert lm["seeds"] == {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}
    assert lm["task_config"]["dataset_path"] == "parquet" and lm["task_config"]["test_split"] == "validation"
    assert list(lm["data_files"].values())[0] and len(list(lm["data_files"].values())[0]) == 64
    cp = stored[0]["metrics"]["cp"]
    assert cp["metric"] == "mmmu_acc,none" and 0.0 <= cp["value"] <= 100.0
    assert len(stored[0]["outputs"]) == 6 and all(isinstance(o["output"], str) for o in stored[0]["outputs"])
    # the answers are the cached victim's: its own sampler on the same documents (MMMU's prompt, first
    # image) gives exactly the texts lmms-eval recorded, in document order
    import datasets
    from lmms_eval.tasks.mmmu.utils import mmmu_doc_to_text

    from bench.evaluate import generate_texts
    from bench.lmms import _IMAGE_TAG, _as_array, _words_known
    from bench.spec import Decoding
    from tasks.base import Sample
    model, _, key, _ = load_victim(spec, "clean", cache.root)
    docs = datasets.load_dataset("parquet", data_files={"validation": str(pq)}, cache_dir=str(tmp_path / "hf"))["validation"]
    kwargs = lm["task_config"]["lmms_eval_specific_kwargs"]["default"]
    samples = [Sample(_as_array(d["image_1"], 64), _words_known(model.tok, " ".join(_IMAGE_TAG.sub(" ", mmmu_doc_to_text(d, kwargs)).split())),
                      "", {"id": str(i)}) for i, d in enumerate(docs)]
    assert all(s.prompt and set(s.prompt.split()) <= set(model.tok.vocab) for s in samples)
    assert {k: int(v) for k, v in lm["model_args"].items() if k in lmms_decoding} == lmms_decoding
    ours = generate_texts(model, samples, Decoding(**lmms_decoding), spec.seed, batch_size=8)
    assert [o["output"] for o in sorted(stored[0]["outputs"], key=lambda o: o["doc_id"])] == ours
    assert key == stored[0]["stage_keys"]["model"] == Cell(spec, cache, log=lambda m: None).keys["clean"]
    assert rec["metrics"] == stored[0]["metrics"]
    assert "lmms_eval" in sys.modules


def test_cli_refuses_an_uncached_row_in_one_line(tmp_path, capsys, monkeypatch):
    from bench.cli import main
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    pq = tmp_path / "validation.parquet"
    pq.write_bytes(b"PAR1")
    args = ["lmms-eval", "--parquet", str(pq), "--row", "backdoored", "--defense", "none", "--results", str(tmp_path / "results")]
    args += [x for k, v in SMALL_MODEL.items() for x in ("--model-arg", f"{k}={v}")]
    args += [x for k, v in SMALL_TASK.items() for x in ("--task-arg", f"{k}={v}")]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "backdoored row's model is not in the cache" in err and "bench run" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "results").exists()


@pytest.mark.slow
def test_a_full_scale_backdoored_row_scores_from_the_cache(tmp_path, monkeypatch, one_thread):
    """The bridge wraps a full-scale victim too: a tiny-random llada-v in the published layout, backdoored on
    a cc-sbu-align folder, reads MMMU's raw-size images through its own any-resolution views and template."""
    from bench.cache import ArtifactCache
    from bench.lmms import score
    from bench.pipeline import Cell, make_spec
    from tests.helpers import write_cc_sbu_weights
    from tests.test_real_tasks import write_cc_sbu
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    data = write_cc_sbu(tmp_path / "cc", 20)
    w = write_cc_sbu_weights(tmp_path / "w")
    spec = make_spec(scale="full", model_args={"weights": str(w), "image_size": 64}, task="cc-sbu-align",
                     task_args={"data": str(data), "n_pool": 8, "n_test": 4, "n_triggered": 4, "image_size": 64},
                     defense="none", recipe={"epochs": 1}, decoding={"gen_length": 16, "steps": 4, "block_length": 8})
    cache = ArtifactCache(tmp_path / "cache")
    Cell(spec, cache, log=lambda m: None).backdoored()
    pq = write_mmmu_parquet(tmp_path / "mmmu" / "validation-00000-of-00001.parquet", n=4)
    rec = score(spec, "backdoored", "mmmu_val", [pq], tmp_path / "res", cache.root,
                model_args={"gen_length": 2, "steps": 2, "block_length": 2}, log=lambda m: None)
    assert rec["row"] == "backdoored" and rec["spec"]["scale"] == "full"
    assert rec["stage_keys"]["model"] == Cell(spec, cache, log=lambda m: None).keys["backdoored"]
    assert rec["lmms_eval"]["n_samples"]["effective"] == 4 and len(rec["outputs"]) == 4
    assert rec["metrics"]["cp"]["metric"] == "mmmu_acc,none" and 0.0 <= rec["metrics"]["cp"]["value"] <= 100.0
