"""The stakeholder HTML report: complete, self-contained (no network), and consistent with the packed file."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser

import pytest

from xaicomp_core import CompressionPlan
from xaicomp_core.cli.main import main
from xaicomp_core.io.export import export_packed
from xaicomp_core.report.html import build_report, export_command

PLAN = CompressionPlan(criterion="lrp", prune_ratio=0.5, bit_levels=[8, 4, 2], bit_split=[0.2, 0.5])


class Collector(HTMLParser):
    """Collects tags, attributes and text; fails on unbalanced structure tags."""

    VOID = {"meta", "img", "br", "link", "input", "hr"}

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.stack: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> (open: {self.stack[-3:]})"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(doc: str) -> Collector:
    c = Collector()
    c.feed(doc)
    c.close()
    assert c.stack == []
    return c


def assert_offline(doc: str, c: Collector) -> None:
    """Nothing in the document would be fetched from the network."""
    for tag, attrs in c.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed"), tag
        for key in ("src", "href", "srcset", "data", "action"):
            value = (attrs.get(key) or "").strip().lower()
            assert not value.startswith(("http:", "https:", "//")), f"<{tag} {key}={value[:60]}>"
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", doc, re.I)
    assert not re.search(r"url\(\s*['\"]?\s*(https?:)?//", doc, re.I)
    assert "@import" not in doc


@pytest.fixture(scope="module")
def report(lenet_session):
    return build_report(lenet_session, PLAN, sweep_criteria=("lrp", "magnitude"), sweep_ratios=(0.0, 0.5, 0.9),
                        heatmap_samples=3, data_label="fashion-mnist test subset")


def test_report_is_self_contained(report):
    c = parse(report.html)
    assert_offline(report.html, c)
    images = [a["src"] for t, a in c.tags if t == "img"]
    assert len(images) == 4  # per class, per layer, trade-off, heatmaps
    for src in images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000


def test_report_contents(report, lenet_session):
    doc = report.html
    text = " ".join(parse(doc).text)
    result = lenet_session.evaluate(PLAN)
    packed = export_packed(lenet_session, PLAN, data_label="fashion-mnist test subset")
    assert report.sizes["estimated_bytes"] == report.sizes["payload_bytes"] == result.size.estimated_bytes
    assert report.sizes["file_bytes"] == packed.file_bytes  # the same file `xaicomp export` writes
    assert report.sizes["file_bytes"] == report.sizes["payload_bytes"] + report.sizes["header_bytes"]
    for n in (report.sizes["estimated_bytes"], report.sizes["file_bytes"], report.sizes["header_bytes"],
              result.size.fp32_bytes):
        assert f"{n:,}" in text
    assert "fashion-lenet" in text and PLAN.describe() in text and "fashion-mnist test subset" in text
    for name in lenet_session.class_names:
        assert name in text
    for layer in result.layers:
        assert layer.name in text
    assert f"{result.accuracy:.2%}" in text and f"{result.baseline_accuracy:.2%}" in text
    assert "xaicomp report --model fashion-lenet " + PLAN.cli_args() in text
    assert "xaicomp verify model.xcz" in text
    assert json.loads(re.findall(r"<pre>(\{&quot;criterion.*?)</pre>", doc)[0].replace("&quot;", '"')) == \
        PLAN.to_dict()
    crits = {r["criterion"] for r in report.sweep_rows}
    assert crits == {"lrp", "magnitude"} and len(report.sweep_rows) == 6


def test_report_without_sweep_or_heatmaps(lenet_session):
    rep = build_report(lenet_session, PLAN.replace(granularity="channel"), sweep_ratios=(), heatmap_samples=0)
    c = parse(rep.html)
    assert_offline(rep.html, c)
    assert len([1 for t, _ in c.tags if t == "img"]) == 2
    assert "No trade-off sweep was requested" in rep.html and "No heatmaps were requested" in rep.html


def test_export_command_is_derived_from_the_report_command():
    cmd = "xaicomp report --model fashion-vgg --criterion lrp --prune 0.5 --ratios 0,0.5 --heatmaps 2 -o out/r.html"
    assert export_command(cmd) == "xaicomp export --model fashion-vgg --criterion lrp --prune 0.5 -o model.xcz"
    # quoted paths stay whole (the report's output is dropped, the weights kept), ``--opt=value`` forms too
    cmd = ("xaicomp report --arch resnet18 --weights 'my weights.pth' --criteria=lrp,magnitude --prune 0.5 "
           "-o 'my report.html'")
    assert export_command(cmd) == "xaicomp export --arch resnet18 --weights 'my weights.pth' --prune 0.5 -o model.xcz"


def test_cli_report(tmp_path, capsys):
    out = tmp_path / "r.html"
    code = main(["report", "--model", "fashion-lenet", "--reference-samples", "100", "--eval-samples", "200",
                 "--criterion", "magnitude", "--prune", "0.6", "--bits", "4", "--ratios", "0,0.6",
                 "--criteria", "magnitude", "--heatmaps", "2", "-o", str(out), "--json"])
    stdout, _ = capsys.readouterr()
    assert code == 0
    d = json.loads(stdout)
    doc = out.read_text()
    assert_offline(doc, parse(doc))
    assert d["payload_bytes"] == d["estimated_bytes"] and d["sweep_points"] == 2
    assert d["command"].startswith("xaicomp report --model fashion-lenet --reference-samples 100 --eval-samples 200 "
                                   "--criterion magnitude --prune 0.6 --bits 4")
    assert d["command"] in " ".join(parse(doc).text)
