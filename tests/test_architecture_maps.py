"""The common-structure maps of the issue-16 architectures (data in core/structure_maps_*.py),
CLIP's towers, and the tools (Visualization, the common tree, the selection page) on them."""
import re

import pytest

import tiny_models as tm
from opendelta import CommonStructureMap, LoraModel, Visualization
from opendelta.core.shapes import is_linear_like, is_norm
from opendelta.core.structure_maps import COMMON_STRUCTURES
from opendelta.core.structure_maps_vision import LAYOUT_ALTERNATIVES
from opendelta.tools.interactive.server import render_page

transformers = pytest.importorskip("transformers")
LINEAR_LEAVES = {"q", "k", "v", "qkv", "proj", "w1", "w2", "w3"}
NORM_LEAVES = {"layer_norm", "post_layer_norm"}


def _pattern(original):
    return re.compile(r"(?:.*\.)?" + re.escape(original).replace(r"\{i\}", r"\d+"))


@pytest.mark.parametrize("arch", tm.NEW_ARCH_NAMES)
def test_every_map_entry_names_a_module_of_the_right_kind(arch):
    """As tests/test_transformers_names.py does for the text models; ViT's map holds two
    layouts (transformers 5.0's and 5.24's): exactly one of them must name modules."""
    model = tm.build(arch, "lm")
    model_type = model.config.model_type
    assert model_type == arch and model_type in COMMON_STRUCTURES
    assert transformers.AutoConfig.for_model(model_type).model_type == model_type
    modules = dict(model.named_modules())
    hits = {original: [n for n in modules if _pattern(original).fullmatch(n)]
            for original in COMMON_STRUCTURES[model_type]}
    groups = LAYOUT_ALTERNATIVES.get(model_type, [])
    present = [g for g in groups if all(hits[e] for e in g)]
    absent = [g for g in groups if not any(hits[e] for e in g)]
    assert len(present) == (1 if groups else 0) and len(absent) == len(groups) - len(present)
    alternative = {e for g in groups for e in g}
    unmatched = [o for o, h in hits.items() if not h and o not in alternative]
    assert unmatched == [], f"map entries naming no module on transformers {transformers.__version__}"
    wrong = []
    for original, names in hits.items():
        leaf = COMMON_STRUCTURES[model_type][original].rsplit(".", 1)[-1]
        for name in names:
            if (leaf in LINEAR_LEAVES and not is_linear_like(modules[name])) or \
                    (leaf in NORM_LEAVES and not is_norm(modules[name])):
                wrong.append(f"{name} ({type(modules[name]).__name__}) as {leaf}")
    assert wrong == []


STACKS = {
    "vit": {"vit.layers": "encoder.block"} if hasattr(tm.build("vit", "base"), "layers")
    else {"vit.encoder": "encoder", "vit.encoder.layer": "encoder.block"},
    "clip": {"text_model": "text", "text_model.encoder": "text.encoder",
             "text_model.encoder.layers": "text.encoder.block",
             "vision_model": "vision", "vision_model.encoder": "vision.encoder",
             "vision_model.encoder.layers": "vision.encoder.block"},
    "whisper": {"model.encoder": "encoder", "model.encoder.layers": "encoder.block", "model.decoder": "decoder",
                "model.decoder.layers": "decoder.block"},
    "gemma3_text": {"model.layers": "decoder.block"},
    "phi3": {"model.layers": "decoder.block"},
    "qwen3": {"model.layers": "decoder.block"},
    "modernbert": {"model.layers": "encoder.block"},
}


@pytest.mark.parametrize("arch", tm.NEW_ARCH_NAMES)
def test_layer_stacks_and_attention_have_their_common_names(arch):
    model = tm.build(arch, "lm")
    mapping = CommonStructureMap(model)
    common = {name: mapping.transform(name) for name, _ in model.named_modules()}
    stacks = {n: c for n, c in common.items() if c and c.rsplit(".", 1)[-1] in ("text", "vision", "encoder",
                                                                                "decoder", "block")}
    assert stacks == STACKS[arch]
    projections = sorted({c.split(".attn.", 1)[1] for c in common.values() if c and ".attn." in c
                          and c.rsplit(".", 1)[-1] in LINEAR_LEAVES})
    assert projections == (["proj", "qkv"] if arch in ("phi3", "modernbert") else ["k", "proj", "q", "v"])
    if arch == "whisper":  # the decoder's cross-attention over the encoder
        assert common["model.decoder.layers.1.encoder_attn.k_proj"] == "decoder.block.1.crossattn.k"
        assert common["proj_out"] == "lm_head.proj"


def test_clip_towers_are_addressable_separately():
    model = tm.build("clip", "lm")
    both = LoraModel(model)
    hosts = [h for h, _, _ in both.layer_entries()]
    assert len(hosts) == 2 * 2 * tm.LAYERS  # q and v of every layer of both towers
    both.detach()
    text = LoraModel(model, modified_modules=["attn.q", "attn.v"], exclude_modules=["vision"], common_structure=True)
    assert {h.split(".")[0] for h, _, _ in text.layer_entries()} == {"text_model"}
    text.detach()
    first = LoraModel(model, modified_modules=["vision.encoder.block.0.attn.q"], common_structure=True)
    assert [h for h, _, _ in first.layer_entries()] == ["vision_model.encoder.layers.0.self_attn.q_proj"]
    first.detach()
    by_name = LoraModel(model, modified_modules=["text_model.encoder.layers.1.self_attn.v_proj"])
    assert len(by_name.layer_entries()) == 1


@pytest.mark.parametrize("arch", tm.NEW_ARCH_NAMES)
def test_visualization_folds_blocks_and_shows_towers(arch):
    model = tm.build(arch, "lm")
    LoraModel(model)
    vis = Visualization(model)
    vis.structure_graph(printTree=False)
    text = vis.export_text()
    # Repeated blocks fold into one node named "0-1" (per tower or stack); ModernBERT's first
    # block differs from the others (no norm before its attention), so it stays apart.
    stacks = {"clip": 2, "whisper": 2, "modernbert": 0}.get(arch, 1)
    assert len(re.findall(r"\b0-1 \(", text)) == stacks, text
    assert "lora_A:[8, 32]" in text  # the delta's parameters are drawn
    vis.structure_graph(common_structure=True, printTree=False)
    common = vis.export_text()
    for tower in {"clip": ["text", "vision"], "whisper": ["encoder", "decoder"]}.get(arch, []):
        assert re.search(rf"^\S+ {tower} \((?:virtual|\w+)\)", common, re.M), common
    assert (stacks == 0 or re.search(r"\b0-1 \(", common)) and "attn" in common
    page = render_page(model, token="t", title="root").decode()
    assert ('"n": ["0", "1"]' in page) == (stacks > 0)  # the page's tree is folded too


def test_vision_models_without_a_token_input_fail_clearly_for_soft_prompts():
    from opendelta import SoftPromptModel

    with pytest.raises(ValueError, match="SoftPrompt cannot read the size of the input embedding"):
        SoftPromptModel(tm.build("vit", "lm"))
