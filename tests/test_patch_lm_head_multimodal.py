"""rk.patch on multimodal wrappers (lm_head.MULTIMODAL_CLASSES: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Llava, Mistral 3,
Gemma 3, Gemma 4, PaliGemma <Type>ForConditionalGeneration), tiny random-init models built from configs: the fused
lm_head path's log-probs, entropy, loss and parameter gradients (vision tower included) equal the model's own logits'
in float64, on text-only inputs and with an image; each wrapper's logit rule is its own forward's (Gemma 4 and
PaliGemma soft-cap at their text config's final_logit_softcapping, Gemma 3's wrapper does not), and the other rule's
log-probs differ, so the check tells them apart. Unverified wrappers stay refused."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close
from test_patch_lm_head import _check_grads, _expected

transformers = pytest.importorskip("transformers")

import r1kernels as rk  # noqa: E402
from r1kernels.patch.lm_head import (  # noqa: E402
    MULTIMODAL_CLASSES,
    logit_scaling,
    patch_lm_head,
    unsupported_reason,
)

V = 61
IMG, BOI, EOI = V - 1, V - 2, V - 3  # image placeholder, image start and end ids; text ids are drawn in [1, V - 8)
CAP = 2.0  # final_logit_softcapping of the Gemma text configs, of the order of the scaled head's logits
TEXT = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
VIT = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, patch_size=2)  # tiny ViT
QWEN_VISION = dict(depth=1, num_heads=2, patch_size=2, spatial_merge_size=2, temporal_patch_size=2)
MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}  # head_dim 8: 4 frequencies


def _image_block(ids):
    """ids with one image of 4 placeholder tokens at positions 5..8 (between BOI and EOI), after the left padding of
    _inputs' last row."""
    ids = ids.clone()
    ids[:, 4], ids[:, 5:9], ids[:, 9] = BOI, IMG, EOI
    return ids


def _qwen_vl(name, vision):
    cfg = getattr(transformers, f"{name}Config")(
        text_config=dict(TEXT, rope_parameters=MROPE),
        vision_config={**QWEN_VISION, **vision}, image_token_id=IMG, video_token_id=V - 4,
        vision_start_token_id=BOI, vision_end_token_id=EOI)

    def images(ids):  # one 8 x 8 image per row: a 4 x 4 patch grid, merged 2 x 2 into 4 tokens
        return dict(pixel_values=torch.randn(ids.shape[0] * 16, 3 * 2 * 2 * 2),
                    image_grid_thw=torch.tensor([[1, 4, 4]] * ids.shape[0]), mm_token_type_ids=(ids == IMG).int())
    return getattr(transformers, f"{name}ForConditionalGeneration")(cfg), images


def _llava():
    cfg = transformers.LlavaConfig(
        text_config=dict(TEXT, model_type="llama"), image_token_index=IMG, vision_feature_layer=-1,
        vision_config=dict(VIT, image_size=4, projection_dim=16, model_type="clip_vision_model"),
        vision_feature_select_strategy="default")  # 2 x 2 patches, the CLS token dropped: 4 tokens

    def images(ids):
        return dict(pixel_values=torch.randn(ids.shape[0], 3, 4, 4))
    return transformers.LlavaForConditionalGeneration(cfg), images


def _mistral3():
    cfg = transformers.Mistral3Config(
        text_config=dict(TEXT, model_type="mistral"), image_token_index=IMG, spatial_merge_size=2,
        vision_config=dict(VIT, image_size=8, head_dim=8, model_type="pixtral"), vision_feature_layer=-1)

    def images(ids):  # 4 x 4 patches merged 2 x 2: 4 tokens
        return dict(pixel_values=torch.randn(ids.shape[0], 3, 8, 8), image_sizes=torch.tensor([[8, 8]] * ids.shape[0]))
    return transformers.Mistral3ForConditionalGeneration(cfg), images


def _gemma3():
    cfg = transformers.Gemma3Config(
        text_config=dict(TEXT, final_logit_softcapping=CAP), vision_config=dict(VIT, image_size=8),
        mm_tokens_per_image=4, image_token_index=IMG, boi_token_index=BOI, eoi_token_index=EOI)

    def images(ids):  # 4 x 4 patches average-pooled to 2 x 2 tokens; token_type_ids: bidirectional within the image
        return dict(pixel_values=torch.randn(ids.shape[0], 3, 8, 8), token_type_ids=(ids == IMG).long())
    return transformers.Gemma3ForConditionalGeneration(cfg), images


def _gemma4():
    text = dict(TEXT, final_logit_softcapping=CAP, layer_types=["full_attention"], global_head_dim=8,
                vocab_size_per_layer_input=V, hidden_size_per_layer_input=8)
    vision = dict(VIT, num_key_value_heads=2, head_dim=8, pooling_kernel_size=2, position_embedding_size=16)
    cfg = transformers.Gemma4Config(text_config=text, vision_config=vision, image_token_id=IMG, boi_token_id=BOI,
                                    eoi_token_id=EOI, video_token_id=V - 4, audio_token_id=V - 5, boa_token_id=V - 6,
                                    eoa_token_index=V - 7)

    def images(ids):  # 16 patches of 2 x 2 pixels at their (x, y), pooled 2 x 2 into 4 tokens
        xy = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="xy"), -1).reshape(1, 16, 2)
        return dict(pixel_values=torch.rand(ids.shape[0], 16, 12), image_position_ids=xy.repeat(ids.shape[0], 1, 1),
                    mm_token_type_ids=(ids == IMG).long())
    return transformers.Gemma4ForConditionalGeneration(cfg), images


def _paligemma():
    cfg = transformers.PaliGemmaConfig(
        text_config=dict(TEXT, model_type="gemma2", final_logit_softcapping=CAP), projection_dim=32,
        vision_config=dict(VIT, image_size=4), image_token_index=IMG)

    def images(ids):  # 4 tokens; token_type_ids 0: the prefix (attended bidirectionally), 1: the suffix
        prefix = torch.arange(ids.shape[1]) < 10
        return dict(pixel_values=torch.randn(ids.shape[0], 3, 4, 4),
                    token_type_ids=(~prefix).long().expand(ids.shape[0], -1).clone())
    return transformers.PaliGemmaForConditionalGeneration(cfg), images


BUILD = {
    "qwen2_vl": lambda: _qwen_vl("Qwen2VL", dict(embed_dim=16, hidden_size=32)),
    "qwen2_5_vl": lambda: _qwen_vl("Qwen2_5_VL", dict(hidden_size=16, out_hidden_size=32, intermediate_size=24,
                                                      fullatt_block_indexes=[0], window_size=8)),
    "qwen3_vl": lambda: _qwen_vl("Qwen3VL", dict(hidden_size=16, out_hidden_size=32, intermediate_size=24,
                                                 num_position_embeddings=16, deepstack_visual_indexes=[0])),
    "llava": _llava, "mistral3": _mistral3, "gemma3": _gemma3, "gemma4": _gemma4, "paligemma": _paligemma,
}
CAPPED = ("gemma4", "paligemma")  # their forward soft-caps at the text config's final_logit_softcapping


def _model(family):
    """The tiny wrapper (eval, eager attention) and images(ids) -> its image inputs for _image_block(ids). Gemma
    heads are scaled so that their logits z are of the cap's size (the default init keeps |z| ~0.1, where
    c * tanh(z / c) ~ z and a soft-cap would not show)."""
    try:
        model, images = BUILD[family]()
    except AttributeError as e:  # pyproject allows transformers >= 4.56, before some of these families
        pytest.skip(f"this transformers lacks {family}: {e}")
    model = model.eval()
    model.set_attn_implementation("eager")
    if family.startswith(("gemma", "paligemma")):
        with torch.no_grad():
            model.lm_head.weight.mul_(15)  # tied to the embeddings: they scale too
    return model, images


def _inputs(images, B=3, L=14):
    """ids, mask (the last row left-padded), labels (-100: padding, image placeholders, 20% at random) and the image
    inputs (images None: none). No pad id 0 among the ids: Gemma's embeddings zero that row (padding_idx)."""
    ids = torch.randint(1, V - 8, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[-1, :3] = 0
    extra = {}
    if images is not None:
        ids = _image_block(ids)
        extra = images(ids)
    labels = ids.masked_fill((mask == 0) | (ids == IMG) | (torch.rand(B, L) < 0.2), -100)
    return ids, mask, labels, extra


def _other_rule_logprobs(model, family, ids, mask, labels, temperature, extra):
    """Log-probs of labels [B, L - 1] under the rule the wrapper's forward does not apply: uncapped z for a capped
    wrapper, CAP * tanh(z / CAP) for Gemma 3's (whose text config sets CAP)."""
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask, **extra).last_hidden_state
        z = model.lm_head(hidden)[:, :-1].double()
    z = z if family in CAPPED else CAP * torch.tanh(z / CAP)
    logp = torch.log_softmax(z / temperature, -1)
    return logp.gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0] * (labels[:, 1:] != -100)


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
@pytest.mark.parametrize("family", list(BUILD))
def test_multimodal_fused_head_matches_logits(family, with_image):
    """The wrapper takes the fused lm_head path (rk.patch: the forward only, no fused layers) with its own forward's
    logit rule; log-probs, entropy, loss and gradients (the vision tower's too, with an image) equal its logits';
    a callable gets softcap=c where the forward caps; the plain forward is unchanged."""
    model, images = _model(family)
    capped = family in CAPPED
    assert unsupported_reason(model) is None
    assert logit_scaling(model).head_kwargs == ({"softcap": CAP} if capped else {})
    patched = copy.deepcopy(model)
    assert list(rk.patch(patched)) == ["forward"]
    temperature = float(torch.empty(()).uniform_(0.6, 1.4))
    patch_lm_head(patched, temperature=temperature)
    ids, mask, labels, extra = _inputs(images if with_image else None)
    out = patched(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, **extra)
    logp, ent, loss = _expected(model, ids, mask, labels, temperature, **extra)
    assert_close(out.log_probs, logp, name="log_probs")
    assert_close(out.entropy, ent, name="entropy")
    assert_close(out.loss, loss, name="loss")
    if family in CAPPED + ("gemma3",):  # the check tells the rules apart
        other = _other_rule_logprobs(model, family, ids, mask, labels, temperature, extra)
        assert (other - logp).abs().max() > 0.1
    _check_grads(model, patched, out, logp, ent)
    if with_image:  # the image reached the hidden states: the vision tower (all but the language model) has gradients
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in patched.named_parameters()
                   if n.startswith("model.") and not n.startswith("model.language_model."))

    def head(h, w, bias, softcap=None):
        seen.append(softcap)
        return rk.linear_token_logprobs(h, w, ids[:, -5:], bias=bias, temperature=temperature, softcap=softcap)

    seen = []
    got = patched(input_ids=ids, attention_mask=mask, logits_to_keep=5, fused_lm_head=head, **extra)
    assert seen == [CAP if capped else None]
    with torch.no_grad():
        want = _expected(model, ids, mask, ids, temperature, **extra)[0][:, -5:]
        assert_close(got, want, name="callable's log-probs")
        torch.testing.assert_close(patched(input_ids=ids, attention_mask=mask, **extra).logits,
                                   model(input_ids=ids, attention_mask=mask, **extra).logits)


def test_every_listed_wrapper_is_checked():
    """lm_head.MULTIMODAL_CLASSES are the wrappers test_multimodal_fused_head_matches_logits builds: a wrapper listed
    there without a check here fails."""
    assert sorted(type(build()[0]).__name__ for build in BUILD.values()) == sorted(MULTIMODAL_CLASSES)


def test_multimodal_positional_arguments_are_the_forwards():
    """Arguments passed by position are read by the patched forward's own signature: Qwen2-VL's labels (its 6th
    parameter, where Qwen2VLModel has use_cache) score the same as by keyword (they were not seen: 'labels ...
    required'), Llava's pixel_values (2nd) reach the vision tower."""
    model, _ = _model("qwen2_vl")
    rk.patch(model)
    ids, mask, labels, _ = _inputs(None)
    want = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    got = model(ids, mask, None, None, None, labels, fused_lm_head=True)
    assert torch.equal(got.log_probs, want.log_probs)
    with pytest.raises(TypeError, match="labels"):  # as the forward itself would
        model(ids, mask, None, None, None, labels, labels=labels, fused_lm_head=True)
    model, images = _model("llava")
    rk.patch(model)
    ids, mask, labels, extra = _inputs(images)
    want = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, **extra)
    got = model(ids, extra["pixel_values"], mask, labels=labels, fused_lm_head=True)
    assert torch.equal(got.log_probs, want.log_probs)


def test_unverified_multimodal_wrapper_is_refused():
    """A wrapper whose forward is not checked here (LlavaNext, whose language model is a Llama) is refused by name,
    by patch_lm_head and rk.patch, though its language model's type is known."""
    cfg = transformers.LlavaNextConfig(
        text_config=dict(TEXT, model_type="llama"), image_token_index=IMG,
        vision_config=dict(VIT, image_size=4, projection_dim=16, model_type="clip_vision_model"))
    model = transformers.LlavaNextForConditionalGeneration(cfg)
    assert "LlavaNextForConditionalGeneration is not one of" in unsupported_reason(model)
    with pytest.raises(ValueError, match="no fused lm_head path for this model"):
        patch_lm_head(model)
    with pytest.raises(ValueError, match="no module that r1kernels.patch supports"):
        rk.patch(model)
