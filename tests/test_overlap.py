"""The overlap command and library: Jaccard matrix, neurons per layer, shared core, containment."""

import csv
import json
from itertools import combinations

import numpy as np
import pyarrow.parquet as pq
import pytest

from neuronreg.cli._tables import jaccard_table
from neuronreg.errors import MaskError
from neuronreg.manifest import load_manifest
from neuronreg.mask import NeuronMask
from neuronreg.overlap import (
    containment,
    intersection_counts,
    jaccard_matrix,
    language_order,
    overlap,
    per_layer,
    shared_core,
)

from support.cli import assert_one_line_error, neuron_file, run
from support.tiny import TOP_RATE

PNG = b"\x89PNG\r\n\x1a\n"


def compute(planted, registry):
    return run("compute", planted / "model", "en", "ru", "el", "--corpus", planted / "texts", "--tokens", "3k",
               "--seq-len", 64, "--top-rate", TOP_RATE, "--registry", registry, "-q")


def parquet_sets(folder) -> dict[str, set[tuple[int, int]]]:
    """Each language's neurons straight from its Parquet file, as a set of (layer, neuron)."""
    sets = {}
    for path in sorted(folder.glob("*.parquet")):
        table = pq.read_table(path, columns=["layer", "neuron"])
        sets[path.stem] = set(zip(table["layer"].to_pylist(), table["neuron"].to_pylist()))
    return sets


def mask(language, per_layer_neurons, layers=3, width=10, model="m"):
    pairs = [(layer, j) for layer, neurons in enumerate(per_layer_neurons) for j in neurons]
    return NeuronMask(model, language, layers, width, np.array([p[0] for p in pairs], np.int64),
                      np.array([p[1] for p in pairs], np.int64))


# -- the command on a computed registry ---------------------------------------------------------------------
@pytest.mark.parametrize("top_rate", [None, "0.3"])
def test_jaccard_matrix_equals_an_independent_computation_from_the_parquet_files(planted, tmp_path, top_rate):
    reg, out = tmp_path / "reg", tmp_path / "out"
    compute(planted, reg)
    chosen = ()
    if top_rate:  # a larger selection, where the languages share neurons
        run("select", "model", "--top-rate", top_rate, "--registry", reg, "-q")
        chosen = ("--top-rate", top_rate)
    result = run("overlap", "model", *chosen, "--registry", reg, "--out", out)

    sets = parquet_sets(neuron_file(reg, "model", "en", "top30" if top_rate else None).parent)
    assert sorted(sets) == ["el", "en", "ru"]
    data = json.loads((out / "overlap.json").read_text())
    assert data["languages"] == ["ru", "el", "en"]  # by script: Cyrl, Grek, Latn
    assert (data["num_layers"], data["intermediate_size"]) == (2, 48)
    for a in sets:
        assert data["neurons"][a] == len(sets[a])
        for b in sets:
            union = sets[a] | sets[b]
            assert data["intersections"][a][b] == len(sets[a] & sets[b])
            assert data["jaccard"][a][b] == pytest.approx(len(sets[a] & sets[b]) / len(union) if union else 0.0)
    for lang, neurons in sets.items():
        assert data["per_layer"][lang] == [sum(1 for layer, _ in neurons if layer == i) for i in range(2)]
    for k in (1, 2, 3):
        held = {n for n in set().union(*sets.values()) if sum(n in s for s in sets.values()) >= k}
        assert data["shared_core"][str(k)]["neurons"] == len(held)
    if top_rate is None:  # the planted neurons: each fires on one script only
        assert data["shared_core"]["1"]["neurons"] == 9 and data["shared_core"]["2"]["neurons"] == 0
    else:
        assert any(data["intersections"][a][b] for a, b in combinations(sets, 2))

    with (out / "jaccard.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["language", "neurons", "ru", "el", "en"]
    for row in rows[1:]:
        assert int(row[1]) == len(sets[row[0]])
        assert [float(x) for x in row[2:]] == [data["jaccard"][row[0]][b] for b in rows[0][2:]]
    with (out / "shared_core.csv").open(newline="") as f:
        core = list(csv.reader(f))
    assert core[0] == ["k", "at_least_k", "exactly_k", "layer_0", "layer_1"] and len(core) == 4
    for name in ("overlap.png", "per_layer.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert result.stdout.splitlines()[1].split() == ["jaccard", "ru", "el", "en"]
    assert "shared core" in result.stdout


def test_languages_keep_the_users_order_and_json_goes_to_stdout(planted, tmp_path):
    reg, out = tmp_path / "reg", tmp_path / "out"
    compute(planted, reg)
    result = run("overlap", "model", "--languages", "English,el", "--registry", reg, "--out", out, "--json")
    data = json.loads(result.stdout)  # status goes to stderr
    assert "Wrote" in result.stderr
    assert data["languages"] == ["en", "el"] and data["grouped_order"] == ["el", "en"]
    assert data == json.loads((out / "overlap.json").read_text())
    table = run("overlap", "model", "--languages", "en,ru", "--registry", reg, "--out", out, "-q").output
    assert table.splitlines()[1].split() == ["jaccard", "en", "ru"]
    assert table.splitlines()[2].split() == ["en", "(3)", "1.00", "0"]


def test_masks_of_different_dimensions_are_one_line_and_nothing_is_written(planted, tmp_path):
    reg, out = tmp_path / "reg", tmp_path / "out"
    compute(planted, reg)
    # The Greek file now says it is of a model with a wider MLP.
    path = neuron_file(reg, "model", "el")
    table = pq.read_table(path)
    record = json.loads(table.schema.metadata[b"neuronreg"])
    record["model"]["intermediate_size"] = 64
    pq.write_table(table.replace_schema_metadata({b"neuronreg": json.dumps(record).encode()}), path)

    result = run("overlap", "model", "--registry", reg, "--out", out, ok=False)
    assert_one_line_error(result, "shape")
    assert not out.exists() or not any(out.iterdir())


def test_unwritable_out_is_checked_before_any_work(planted, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run("overlap", "no-such-model", "--out", blocker / "out", ok=False)
    assert_one_line_error(result, "Cannot write to")


def test_help_has_an_example():
    assert "Example:" in run("overlap", "--help").output


# -- the library on hand-made masks ---------------------------------------------------------------------------
def test_shared_core_per_k_and_per_layer():
    masks = {"a": mask("a", [[0, 1], [2], []]),
             "b": mask("b", [[1], [2, 3], [4]]),
             "c": mask("c", [[1, 5], [2], [4]])}
    core = shared_core(masks)
    # union: (0,0) (0,1) (0,5) (1,2) (1,3) (2,4); held by 3: (0,1) (1,2); by 2 or more: those and (2,4).
    assert core.at_least == [6, 3, 2]
    assert core.per_layer == [[3, 2, 1], [1, 1, 1], [1, 1, 0]]
    assert [core.exactly(k) for k in (1, 2, 3)] == [3, 1, 2]
    assert core.count(4) == 0
    assert per_layer(masks) == {"a": [2, 1, 0], "b": [1, 2, 1], "c": [2, 1, 1]}
    counts = intersection_counts(masks)
    assert counts["a"] == {"a": 3, "b": 2, "c": 2} and counts["b"]["c"] == 3
    jac = jaccard_matrix(masks)
    assert jac["b"]["c"] == pytest.approx(3 / 5) and jac["a"]["a"] == 1.0
    for x in masks:
        for y in masks:
            assert jac[x][y] == pytest.approx(masks[x].jaccard(masks[y]))


def test_empty_masks_have_jaccard_zero_and_an_empty_core():
    masks = {"a": mask("a", [[], [], []]), "b": mask("b", [[], [1], []])}
    report = overlap(masks)
    assert report.jaccard["a"] == {"a": 0.0, "b": 0.0}
    assert report.core.at_least == [1, 0]


def test_containment_of_a_small_selection_in_a_large_one():
    small = {"x": mask("x", [[1], [2], []]), "y": mask("y", [[], [], [9]]), "z": mask("z", [[], [], []])}
    large = {"x": mask("x", [[1, 3], [2, 4], [5]]), "y": mask("y", [[0], [], [8]]), "z": mask("z", [[1], [], []]),
             "only_large": mask("only_large", [[1], [], []])}
    result = containment(small, large)
    assert list(result) == ["x", "y", "z"]
    assert (result["x"].shared, result["x"].contained, result["x"].jaccard) == (2, 1.0, pytest.approx(2 / 5))
    assert (result["y"].shared, result["y"].contained, result["y"].jaccard) == (0, 0.0, 0.0)
    assert result["z"].contained is None and result["z"].to_json()["large"] == 1
    with pytest.raises(MaskError, match="no language in common"):
        containment({"x": small["x"]}, {"y": large["y"]})
    with pytest.raises(MaskError, match="3 x 10 and 4 x 10"):
        containment(small, {"x": mask("x", [[1], [], [], []], layers=4)})


def test_masks_of_different_shapes_are_a_mask_error_naming_both():
    masks = {"a": mask("a", [[1], [], []]), "b": mask("b", [[1], [], []], width=12)}
    for compare in (overlap, jaccard_matrix, shared_core, per_layer, intersection_counts):
        with pytest.raises(MaskError, match=r"a and b .*3 x 10 and 3 x 12"):
            compare(masks)


def test_order_by_script_then_code_with_unknown_languages_last():
    manifest = load_manifest()
    assert language_order(["en", "zz", "ru", "de", "ar", "el", "uk"], manifest) == ["ar", "ru", "uk", "el", "de",
                                                                                   "en", "zz"]


def test_report_table_and_files(tmp_path):
    masks = {"en": mask("en", [[1, 2], [3], []]), "de": mask("de", [[1], [3], [7]])}
    report = overlap(masks, load_manifest(), order=["en", "de"])
    assert jaccard_table(report) == ["jaccard           en      de",
                                     "en (3)          1.00   0.500",
                                     "de (3)         0.500    1.00"]
    paths = report.save(tmp_path / "new" / "out")
    assert sorted(p.name for p in paths.values()) == sorted(p.name for p in (tmp_path / "new" / "out").iterdir())
    assert json.loads(paths["json"].read_text())["jaccard"]["en"]["de"] == 0.5


def test_a_small_selection_inside_a_large_one_from_the_command_line(planted, tmp_path):
    reg, out = tmp_path / "reg", tmp_path / "out"
    compute(planted, reg)
    run("select", "model", "--top-rate", 0.3, "--registry", reg, "-q")
    result = run("overlap", "model", "--against", "0.3", "--registry", reg, "--out", out)
    data = json.loads((out / "overlap.json").read_text())["containment"]
    assert data["selection"] == "top9.375" and data["against"] == "top30"
    for lang in ("en", "ru", "el"):  # the smaller selection lies wholly inside the larger one
        assert data["languages"][lang]["contained"] == 1.0 and data["languages"][lang]["small"] == 3
    assert "top9.375 inside top30" in result.stdout
