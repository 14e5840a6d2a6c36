"""Pure parts of the scoring heads and the original LLaVA layout (no engine)."""

from __future__ import annotations

import json
import math

import pytest

from treadle.client.scoring import check_labels, class_scores, label_scores, score_prompts
from treadle.gpu_worker.models.cross_encoder import pair_token_types, score_activation
from treadle.gpu_worker.models.llava_llama import hf_name
from treadle.runtime.llava_layout import hf_llava_dict, is_llava_llama
from treadle.runtime.model_check import ARCHITECTURES, is_embedding_model


def test_pair_token_types_match_berts_pair_encoding():
    from transformers import AutoTokenizer

    from treadle.runtime.model_files import minilm_dir

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    for q, d in (("what is a panda?", "a bear"), ("x", "y z w"), ("", "doc")):
        enc = tok(q, d)
        assert pair_token_types(enc["input_ids"], tok.sep_token_id) == enc["token_type_ids"]
    single = tok("one text")
    assert pair_token_types(single["input_ids"], tok.sep_token_id) == single["token_type_ids"]
    assert pair_token_types([5, 6], 102) == [0, 0]


def test_score_activation_from_config():
    class C:
        sbert_ce_default_activation_function = "torch.nn.modules.activation.Sigmoid"

    import torch

    assert score_activation(C())(torch.tensor([0.0])).item() == 0.5
    assert score_activation(object())(torch.tensor([3.0])).item() == 3.0
    C.sbert_ce_default_activation_function = "os.system"
    with pytest.raises(ValueError, match="not supported"):
        score_activation(C())


def test_score_prompts_and_labels():
    assert score_prompts("Q ", ["a", "b"], False) == ("prompt", ["Q a", "Q b"])
    assert score_prompts("Q", "a", True) == ("prompt", ["aQ"])
    assert score_prompts([1, 2], [[3], [4, 5]], True) == ("input_ids", [[3, 1, 2], [4, 5, 1, 2]])
    with pytest.raises(ValueError, match="both"):
        score_prompts("Q", [[1]], False)
    assert check_labels([3, 4], 10) == [3, 4]
    for bad, match in ((None, "must be provided"), ([], "non-empty"), ([True], "non-empty"), ([10], "out of vocabulary")):
        with pytest.raises(ValueError, match=match):
            check_labels(bad, 10)


def test_label_scores_softmax_and_probabilities():
    meta = {"output_token_ids_logprobs": [[(math.log(0.2), 7, None), (math.log(0.05), 9, None)]]}
    assert label_scores(meta, [7, 9], False) == pytest.approx([0.2, 0.05])
    assert label_scores(meta, [7, 9], True) == pytest.approx([0.8, 0.2])
    assert class_scores([0.0, 0.0], True) == [0.5, 0.5] and class_scores(1.5, False) == [1.5]


def test_registry_and_score_detection(tmp_path):
    for arch in ("LlamaForSequenceClassification", "Qwen2ForRewardModel", "BertForSequenceClassification",
                 "XLMRobertaForSequenceClassification", "LlavaLlamaForCausalLM"):
        assert arch in ARCHITECTURES
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForRewardModel"]}))
    assert is_embedding_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert not is_embedding_model(str(tmp_path))


def test_original_llava_names_and_config(tmp_path):
    assert hf_name("model.mm_projector.0.weight") == "multi_modal_projector.linear_1.weight"
    assert hf_name("model.mm_projector.2.bias") == "multi_modal_projector.linear_2.bias"
    assert hf_name("model.layers.0.mlp.up_proj.weight") == "language_model.model.layers.0.mlp.up_proj.weight"
    assert hf_name("lm_head.weight") == "language_model.lm_head.weight"
    from transformers import CLIPVisionConfig

    tower = tmp_path / "tower"
    CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=16, num_attention_heads=2, num_hidden_layers=2).save_pretrained(tower)
    cfg = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "vocab_size": 100, "hidden_size": 32,
           "pad_token_id": 0, "mm_vision_tower": "tower", "mm_projector_type": "mlp2x_gelu",
           "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad"}
    assert is_llava_llama(cfg)
    d = hf_llava_dict(cfg, str(tmp_path))  # the tower path is relative to the model's directory
    assert d["vision_tower_dir"] == str(tower) and d["vision_config"]["image_size"] == 32
    assert d["text_config"]["model_type"] == "llama" and "mm_vision_tower" not in d["text_config"]
    assert (d["image_token_index"], d["vision_feature_layer"], d["vision_feature_select_strategy"]) == (0, -2, "default")
    with pytest.raises(NotImplementedError, match="mm_projector_type"):
        hf_llava_dict({**cfg, "mm_projector_type": "linear"}, str(tmp_path))
    with pytest.raises(ValueError, match="mm_vision_tower"):
        hf_llava_dict({**cfg, "mm_vision_tower": str(tmp_path / "missing")}, str(tmp_path))


def test_expand_to_square_centres_on_the_mean_colour():
    Image = pytest.importorskip("PIL.Image")
    from treadle.tokenizer_proc.llava_pad import expand_to_square

    im = Image.new("RGB", (4, 2), (255, 0, 0))
    sq = expand_to_square(im, (1, 2, 3))
    assert sq.size == (4, 4) and sq.getpixel((0, 0)) == (1, 2, 3) and sq.getpixel((0, 1)) == (255, 0, 0)
    assert sq.getpixel((0, 3)) == (1, 2, 3)
    assert expand_to_square(Image.new("RGB", (3, 3)), (0, 0, 0)).size == (3, 3)


def test_roberta_positions_leave_room_for_the_padding_offset():
    from treadle.runtime.hf_config import model_positions

    assert model_positions({"model_type": "xlm-roberta", "max_position_embeddings": 514, "pad_token_id": 1}) == 512
    assert model_positions({"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 0}) == 513
    assert model_positions({"model_type": "bert", "max_position_embeddings": 512}) == 512
