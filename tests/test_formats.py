"""Import and export of the LAPE authors' list[language][layer] -> LongTensor files."""

import json

import pyarrow.parquet as pq
import pytest
import torch

from support.cli import neuron_file, run

REFERENCE = {
    "gurgurov/llama-3.1-5.pt": ("llama-3.1-8b", "mt,af,is,cy,mk,lv,lt,sl,sk,et,ka,ne", "0.05"),
    "rucaibox/LLaMA-2-7B.neuron.pth": ("llama-2-7b", "en,zh,fr,es,vi,id,ja", "0.01"),
    "rucaibox/LLaMA-2-13B.neuron.pth": ("llama-2-13b", "en,zh,fr,es,vi,id,ja", "0.01"),
    # Six entries whose order the authors do not document: any six names do for a round trip.
    "rucaibox/LLaMA-2-70B.neuron.pth": ("llama-2-70b", "en,zh,fr,es,vi,id", "0.01"),
    "rucaibox/Mistral-7B.neuron.pth": ("mistral-7b", "en,zh,fr,es,vi,id", "0.01"),
    "rucaibox/BLOOM-7B.neuron.pth": ("bloom-7b1", "en,zh,fr,es,vi,id", "0.01"),
}




@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_import_then_export_gives_back_the_same_lists(shared, tmp_path, name):
    model, languages, top_rate = REFERENCE[name]
    source = shared / "reference" / "lape-masks" / name
    reg = tmp_path / "reg"
    result = run("import", source, "--model", model, "--languages", languages, "--top-rate", top_rate,
                 "--registry", reg, "-q")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out.pt"
    assert run("export", model, "--format", "lape-pt", "-o", out, "--registry", reg, "-q").exit_code == 0
    original = torch.load(source, weights_only=True)
    exported = torch.load(out, weights_only=True)
    assert len(exported) == len(original)
    for lang_a, lang_b in zip(exported, original):
        assert len(lang_a) == len(lang_b)
        for a, b in zip(lang_a, lang_b):
            assert a.dtype == b.dtype == torch.int64 and torch.equal(a, b)
    first = languages.split(",")[0]
    prov = json.loads(pq.read_schema(neuron_file(reg, model, first)).metadata[b"neuronreg"])
    assert prov["imported"]["file"] == source.name and prov["imported"]["format"] == "lape-pt"
    assert prov["selection"]["method"] == "imported" and prov["selection"]["top_rate"] == float(top_rate)
    assert prov["imported"]["index"] == 0 and not prov.get("counts")


def test_seed_paper_numbers(shared, tmp_path):
    source = shared / "reference/lape-masks/gurgurov/llama-3.1-5.pt"
    reg = tmp_path / "reg"
    run("import", source, "--model", "llama-3.1-8b", "--languages", REFERENCE["gurgurov/llama-3.1-5.pt"][1],
        "--registry", reg)
    ka = json.loads(run("show", "llama-3.1-8b", "Georgian", "--registry", reg, "--json").output)
    cy = json.loads(run("show", "llama-3.1-8b", "cy", "--registry", reg, "--json").output)
    # lape.md: 1150 (ka) to 6020 (cy) neurons, 0.18% to 0.92% of the parameters at 3 x 4096 weights each.
    assert ka["neurons"] == 1150 and cy["neurons"] == 6020
    assert round(100 * ka["share_of_parameters"], 2) == 0.18 and round(100 * cy["share_of_parameters"], 2) == 0.92


def test_export_in_another_order(tmp_path):
    masks = [[torch.tensor([1, 5]), torch.tensor([], dtype=torch.long)], [torch.tensor([0]), torch.tensor([2, 3])]]
    src = tmp_path / "m.pt"
    torch.save(masks, src)
    reg = tmp_path / "reg"
    assert run("import", src, "--model", "acme/tiny", "--layers", 2, "--intermediate-size", 8, "--languages", "sw,en",
               "--registry", reg).exit_code == 0
    out = tmp_path / "out.pt"
    assert run("export", "acme--tiny", "-o", out, "--languages", "en,sw", "--registry", reg).exit_code == 0
    back = torch.load(out, weights_only=True)
    assert [t.tolist() for t in back[0]] == [[0], [2, 3]] and [t.tolist() for t in back[1]] == [[1, 5], []]


@pytest.mark.parametrize("args,fragment", [
    (("--model", "llama-3.1-8b", "--languages", "sw,en,fr"), "holds 2 languages but 3 were named"),
    (("--model", "acme/unknown", "--languages", "sw,en"), "--layers"),
    (("--model", "llama-3.1-8b", "--languages", "sw,en"), "has 2 layers"),
    (("--model", "acme/x", "--layers", 2, "--intermediate-size", 4, "--languages", "sw,en"), "outside 2 layers x 4"),
])
def test_bad_imports_are_one_line_errors(tmp_path, args, fragment):
    src = tmp_path / "m.pt"
    torch.save([[torch.tensor([1, 5]), torch.tensor([2])], [torch.tensor([0]), torch.tensor([2, 3])]], src)
    result = run("import", src, *args, "--registry", tmp_path / "reg", ok=False)
    assert result.exit_code == 1 and fragment in result.output and "Traceback" not in result.output
    assert not (tmp_path / "reg").exists() or not any((tmp_path / "reg").rglob("*.parquet"))


def test_a_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    src = tmp_path / "evil.pt"
    torch.save([Evil()], src)
    result = run("import", src, "--model", "llama-3.1-8b", "--languages", "sw", "--registry", tmp_path / "reg",
                 ok=False)
    assert result.exit_code == 1 and "not a torch.save'd list" in result.output and "owned" not in result.output
