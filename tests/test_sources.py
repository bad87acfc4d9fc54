"""One resolver of models and data for the app and the CLI: disjoint reference and evaluation images, the same split
on both paths, and rendered commands that parse back (with the CLI's own parser) to the same sources and plan."""

from __future__ import annotations

import io
import json
import pathlib
import shlex
import sys
import zipfile

import numpy as np
import pytest

from xaicomp_core import CompressionPlan, XaicompError
from xaicomp_core.cli.common import plan_from_args, session_from_args, sources_from_args
from xaicomp_core.cli.main import build_parser, main
from xaicomp_core.io.models import load_model, model_info
from xaicomp_core.io.sources import (
    DATA_PLACEHOLDER,
    WEIGHTS_PLACEHOLDER,
    CliCommand,
    DataSource,
    ModelSource,
    Sources,
    resolve_data,
)
from xaicomp_core.report.html import default_command, export_command

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the app's pages package

PER_CLASS = 6
CLASSES = 10


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _images() -> dict[str, bytes]:
    """``class/imgK.png`` -> a distinct random 28x28 grayscale PNG (lossless, already the model's size)."""
    rng = np.random.default_rng(7)
    return {f"{c}/img{k}.png": _png(rng.integers(0, 256, (28, 28), dtype=np.uint8))
            for c in range(CLASSES) for k in range(PER_CLASS)}


@pytest.fixture(scope="module")
def image_files() -> dict[str, bytes]:
    return _images()


@pytest.fixture(scope="module")
def image_zip(tmp_path_factory, image_files) -> pathlib.Path:
    path = tmp_path_factory.mktemp("zip") / "my images.zip"  # a space: quoted paths must stay whole
    with zipfile.ZipFile(path, "w") as z:
        for name, data in image_files.items():
            z.writestr(f"mydata/{name}", data)
    return path


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, image_files) -> pathlib.Path:
    root = tmp_path_factory.mktemp("folder") / "my images"
    for name, data in image_files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def lenet_info():
    return model_info(load_model("fashion-lenet"))


def cli_args(*argv: str):
    return build_parser().parse_args(list(argv))


def _rows(images: np.ndarray) -> set[bytes]:
    return {img.tobytes() for img in images}


def _check_disjoint_and_balanced(ref, ev) -> None:
    assert len(ref) == len(ev) == CLASSES * PER_CLASS // 2
    assert not _rows(ref.images) & _rows(ev.images), "an image is both reference and evaluation"
    assert len(_rows(ref.images) | _rows(ev.images)) == CLASSES * PER_CLASS  # together: every image once
    assert ref.class_counts().tolist() == ev.class_counts().tolist() == [PER_CLASS // 2] * CLASSES


# ----------------------------------------------------------------------------------------------------------------
# the split: disjoint on the CLI's path, the same on the app's
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["zip", "folder"])
def test_cli_splits_an_image_folder_into_disjoint_reference_and_evaluation(kind, image_zip, image_dir, lenet_info):
    data = image_zip if kind == "zip" else image_dir
    sources = sources_from_args(cli_args("compress", "--model", "fashion-lenet", "--data", str(data)))
    assert sources.data == DataSource("images", data.name, str(data))
    ref, ev, train = sources.load_data(lenet_info)
    _check_disjoint_and_balanced(ref, ev)
    assert train is None  # an ImageFolder gives no fine-tuning images of its own


def test_cli_session_on_a_zip_never_computes_relevance_on_evaluation_images(image_zip):
    args = cli_args("compress", "--model", "fashion-lenet", "--data", str(image_zip), "--threads", "2")
    session = session_from_args(args)
    ref = {tuple(r.flatten().tolist()) for r in session.x_ref}
    ev = {tuple(r.flatten().tolist()) for r in session.x_eval}
    assert len(ref) == len(ev) == 30 and not ref & ev


def test_naming_the_data_as_its_own_reference_still_splits(image_zip, lenet_info):
    sources = sources_from_args(cli_args("compress", "--model", "fashion-lenet", "--data", str(image_zip),
                                         "--reference-data", str(image_zip), "--train-data", str(image_zip)))
    ref, ev, train = sources.load_data(lenet_info)
    _check_disjoint_and_balanced(ref, ev)
    assert train is not None and not _rows(train.images) & _rows(ev.images)


def test_explicit_reference_data_is_used_whole(image_zip, image_dir, lenet_info):
    sources = sources_from_args(cli_args("compress", "--model", "fashion-lenet", "--data", str(image_zip),
                                         "--reference-data", "fashion-mnist", "--eval-samples", "20"))
    ref, ev, _ = sources.load_data(lenet_info)
    assert len(ref) == 1000 and ref.name == "fashion-mnist/reference"
    assert len(ev) == 20 and ev.class_counts().tolist() == [2] * CLASSES


def test_app_and_cli_give_the_same_split_and_session(image_zip, lenet_info):
    from pages.common import DataSpec, ModelSpec, Settings, _cached_data, digest, session_for

    data = image_zip.read_bytes()
    spec = DataSpec("zip", name=image_zip.name, digest=digest(data))
    app_ref, app_ev, app_train = _cached_data(spec.key(), spec, data, (28, 28), 1, tuple(lenet_info.class_names))
    cli = sources_from_args(cli_args("compress", "--model", "fashion-lenet", "--data", str(image_zip),
                                     "--eval-samples", str(spec.eval_samples)))
    ref, ev, train = cli.load_data(lenet_info)
    assert np.array_equal(app_ref.images, ref.images) and np.array_equal(app_ref.labels, ref.labels)
    assert np.array_equal(app_ev.images, ev.images) and np.array_equal(app_ev.labels, ev.labels)
    assert app_train is train is None
    _check_disjoint_and_balanced(app_ref, app_ev)

    # the whole app path (cached model, data and session) against the CLI's session, with fewer reference images
    settings = Settings(model=ModelSpec("builtin", "fashion-lenet"), data=spec, reference_samples=20)
    app_session = session_for(settings, {"data": data})
    cli_session = session_from_args(cli_args("compress", "--model", "fashion-lenet", "--data", str(image_zip),
                                             "--eval-samples", str(spec.eval_samples), "--reference-samples", "20"))
    assert app_session.x_ref.shape[0] == 20
    assert np.array_equal(app_session.x_ref.numpy(), cli_session.x_ref.numpy())
    assert np.array_equal(app_session.x_eval.numpy(), cli_session.x_eval.numpy())
    assert app_session.baseline_accuracy == cli_session.baseline_accuracy


def test_builtin_data_uses_the_shipped_splits(lenet_info):
    ref, ev, train = Sources(data=DataSource(eval_samples=300, reference_samples=200)).load_data(lenet_info)
    assert (len(ref), len(ev), len(train)) == (200, 300, 5000)
    assert ref.class_counts().tolist() == [20] * 10 and ev.class_counts().tolist() == [30] * 10
    assert not _rows(ref.images) & _rows(ev.images)


def _write_idx(path: pathlib.Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


def test_torchvision_folder_splits_reference_and_finetuning_from_its_training_split(tmp_path, lenet_info):
    rng = np.random.default_rng(3)
    raw = tmp_path / "tv root" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 400), ("t10k", 50)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    spec = f"torchvision:fashion-mnist:{tmp_path / 'tv root'}"
    sources = sources_from_args(cli_args("compress", "--model", "fashion-lenet", "--data", spec))
    assert sources.data == DataSource("torchvision", "fashion-mnist", str(tmp_path / "tv root"))
    ref, ev, train = sources.load_data(lenet_info)
    assert len(ev) == 50 and ev.name == "fashion-mnist/test"
    assert len(ref) == 200 and len(train) == 200  # at most half the pool for reference
    assert not _rows(ref.images) & _rows(train.images) and not _rows(ref.images) & _rows(ev.images)


def test_export_and_verify_on_a_zip_evaluate_the_same_half(image_zip, tmp_path, capsys):
    out = tmp_path / "m.xcz"
    assert main(["export", "--model", "fashion-lenet", "--data", str(image_zip), "--criterion", "magnitude",
                 "--prune", "0.5", "--bits", "4", "-o", str(out), "--json", "--threads", "2"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["images"] == 30
    # a path recorded in the (untrusted) file is never opened by verify: the user names the data again
    assert main(["verify", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] is None
    assert main(["verify", str(out), "--data", str(image_zip), "--json"]) == 0
    v = json.loads(capsys.readouterr().out)
    assert v["ok"] and v["data_matches"] and v["logits_match"] and v["images"] == 30


def test_bad_data_forms_are_one_line_errors(capsys):
    with pytest.raises(XaicompError, match="torchvision:NAME:ROOT"):
        DataSource.parse("torchvision:mnist")
    assert main(["compress", "--model", "fashion-lenet", "--eval-samples", "0"]) == 2
    assert "--eval-samples must be at least 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# rendered commands round-trip through the CLI's parser
# ----------------------------------------------------------------------------------------------------------------
SOURCES = [
    Sources(),
    Sources(ModelSource("fashion-lenet"), DataSource(eval_samples=300, reference_samples=200)),
    Sources(ModelSource("fashion-resnet", weights="/tmp/my weights/model v2.safetensors"),
            DataSource.parse("/data/my images.zip", eval_samples=50, reference_samples=7,
                             reference=DataSource.parse("/data/ref folder"),
                             train=DataSource.parse("torchvision:fashion-mnist:/data/tv root")),
            target="predicted", epsilon=1e-4),
    Sources(ModelSource("resnet18", random_weights=True, download=False),
            DataSource.parse("torchvision:cifar10:/some where"), epsilon=0.123456789),
    Sources(ModelSource("resnet18", random_weights=True)),
]
PLANS = [
    CompressionPlan(),
    CompressionPlan(criterion="lrp", prune_ratio=0.5, bit_levels=[8, 4, 2], bit_split=[0.2, 0.5]),
    CompressionPlan(criterion="magnitude", prune_ratio=0.123456789, bit_levels=[8, 4, 2], bit_split=[1 / 3, 1 / 3],
                    scope="per-layer", granularity="channel", bit_ranking="magnitude", protect="first-last",
                    quantizer="absmax", composite="epsilon-plus", seed=3, finetune_epochs=2, finetune_lr=0.003),
    CompressionPlan(criterion="paper", bit_levels=[4]),
]


@pytest.mark.parametrize("sources", SOURCES, ids=range(len(SOURCES)))
@pytest.mark.parametrize("plan", PLANS, ids=range(len(PLANS)))
@pytest.mark.parametrize("subcommand", ["compress", "export", "report"])
def test_rendered_command_parses_back_to_the_same_sources_and_plan(sources, plan, subcommand, tmp_path):
    out = {"compress": None, "export": "out dir/model.xcz", "report": "out dir/r.html"}[subcommand]
    cmd = sources.command(subcommand, plan, output=out)
    assert isinstance(cmd, str) and cmd.startswith(f"xaicomp {subcommand} ")
    assert shlex.split(cmd) == ["xaicomp", *cmd.argv]  # shell words: every quoted path stays one word
    args = build_parser().parse_args(cmd.argv)
    assert args.command == subcommand and (out is None or args.output == out)
    assert sources_from_args(args) == sources
    assert plan_from_args(args) == plan
    assert CliCommand.parse(cmd) == cmd and CliCommand.parse(cmd).words == cmd.words


def test_app_sources_render_as_the_cli_reads_them():
    from pages.common import DataSpec, ModelSpec, Settings, sources_for

    settings = Settings(model=ModelSpec("torchvision", "resnet18", random_weights=True),
                        data=DataSpec("torchvision", "fashion-mnist", root="/data/tv root", eval_samples=500),
                        reference_samples=300)
    sources = sources_for(settings)
    cmd = sources.command("report", PLANS[1], output="r.html")
    assert sources_from_args(build_parser().parse_args(cmd.argv)) == sources
    assert "--random-weights --no-download" in cmd and "'torchvision:fashion-mnist:/data/tv root'" in cmd

    # uploads render as placeholders the user replaces
    uploaded = Settings(model=ModelSpec("upload", "fashion-vgg", weights_name="mine.pt", digest="ab"),
                        data=DataSpec("zip", name="mine.zip", digest="cd"))
    cmd = sources_for(uploaded, {"weights": b"bytes", "data": b"zip"}).command("compress", PLANS[1])
    words = shlex.split(cmd)
    assert words[words.index("--weights") + 1] == WEIGHTS_PLACEHOLDER
    assert words[words.index("--data") + 1] == DATA_PLACEHOLDER
    assert sources_for(uploaded).data_spec() is None  # uploaded images cannot be reloaded by name


def test_report_and_export_commands_come_from_one_renderer(lenet_session):
    sources = Sources(ModelSource("fashion-lenet"), DataSource.parse("/data/my images.zip", eval_samples=40))
    plan = PLANS[1]
    report = sources.command("report", plan, options=[("--ratios", "0,0.5"), ("--heatmaps", "2"),
                                                      ("--codec", "zlib")], output="my report.html")
    expected = sources.command("export", plan, options=[("--codec", "zlib")], output="model.xcz")
    assert export_command(report) == expected
    assert export_command(str(report)) == expected  # the same from plain text
    assert export_command(report, output="x.xcz") == sources.command("export", plan, options=[("--codec", "zlib")],
                                                                     output="x.xcz")
    assert build_parser().parse_args(CliCommand.parse(export_command(report)).argv).codec == "zlib"
    # the report's default command: the session's built-in model by name, the plan, the output
    cmd = default_command(lenet_session, plan, "r.html")
    assert cmd == Sources(ModelSource("fashion-lenet")).command("report", plan, output="r.html")
    assert cmd == "xaicomp report --model fashion-lenet " + plan.cli_args() + " -o r.html"


def test_resolve_data_needs_at_least_one_evaluation_image(lenet_info):
    pre = lenet_info.preprocessing
    with pytest.raises(XaicompError, match="at least 1"):
        resolve_data(DataSource(eval_samples=0), pre.input_size, pre.channels, lenet_info.class_names)
