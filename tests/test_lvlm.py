"""The LVLM: AnomalyGPT's token interface around a local causal LM; answers that agree with verdicts."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from inference.model.api import InspectionModel, ModelConfig, ScoredFrame
from inference.model.lvlm import (
    FIRST_QUESTION,
    IMAGE_SLOT,
    PROMPT_SLOT,
    AnomalyLVLM,
    LvlmConfig,
    default_llm_path,
    factual_answer,
    first_answer,
    guard,
)
from inference.model.prompt_learner import PromptLearner, PromptLearnerConfig
from inference.model.verdict import ModelVerdict
from ingest.simulator import LineSimulator
from lineguard.events import Region

EMBED_DIM = 64


def region(position: str, area_px: int, area_mm2: float | None, x: int = 10, y: int = 10) -> Region:
    return Region(x=x, y=y, w=20, h=20, area_px=area_px, area_mm2=area_mm2, position=position, peak_score=0.5)


ONE = ModelVerdict(0.5, 0.2, True, 0.93, [region("top left", 412, 6.4375)], ["top left"])
TWO = ModelVerdict(0.6, 0.2, True, 0.97, [region("top left", 412, 6.4375), region("bottom right", 150, None, 180, 180)],
                   ["top left", "bottom right"])
NORMAL = ModelVerdict(0.05, 0.2, False, 0.96, [], [])


def scored(verdict: ModelVerdict, seed: int = 0) -> ScoredFrame:
    rng = np.random.default_rng(seed)
    anomaly_map = rng.random((96, 96)).astype(np.float32) * 0.05
    for r in verdict.regions:
        anomaly_map[r.y // 3:(r.y + r.h) // 3, r.x // 3:(r.x + r.w) // 3] = r.peak_score
    return ScoredFrame(verdict, anomaly_map, "disc", rng.random(EMBED_DIM).astype(np.float32))


@pytest.fixture(scope="module")
def lvlm() -> AnomalyLVLM:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    return AnomalyLVLM(LvlmConfig(max_new_tokens=12), embed_dim=EMBED_DIM)


def test_prompt_learner_shapes():
    learner = PromptLearner(PromptLearnerConfig(d_llm=40, widths=(2, 4, 8, 8, 16)))
    prompts = learner(torch.rand(3, 1, 224, 224))
    assert prompts.shape == (3, 18, 40)                     # 9 base + 9 grid tokens
    assert torch.equal(prompts[0, :9], prompts[1, :9])      # base tokens are shared
    assert not torch.equal(prompts[0, 9:], prompts[1, 9:])  # grid tokens follow the map
    assert learner.net(torch.rand(1, 1, 224, 224)).shape == (1, 40, 3, 3)


def test_anomalygpt_answer_forms():
    assert first_answer(NORMAL) == "No, there is no anomaly in the image."
    assert first_answer(ONE) == "Yes, there is an anomaly in the image, at the top left of the image."
    assert first_answer(TWO) == ("Yes, there are 2 anomalies in the image, they are at the top left and bottom right "
                                 "of the image.")


def test_guard_rejects_contradictions_drift_and_missing_figures():
    assert not guard("No, there is no anomaly in the image.", ONE, "Is it damaged?")
    assert not guard("Yes, there is a defect in the image.", NORMAL, "Is it damaged?")
    assert not guard("The anomaly is at the bottom left of the image.", ONE, "Where is it?")
    assert not guard("There are 2 anomalies in the image.", ONE, "Anything else?")
    assert not guard("The anomaly is at the top left of the image.", TWO, "Where are they?")  # one left out
    assert not guard("The image is about the size of a coin.", ONE, "How big is it?")
    assert not guard("the part the part the part the part the part the part", ONE, "Tell me more")
    assert not guard("You should buy a new car.", ONE, "What now?")                        # off topic
    assert guard("The anomaly is at the top left of the image.", ONE, "Where is it?")
    assert guard("The anomaly covers 412 px, about 6.44 mm².", ONE, "How big is it?")
    assert not guard("The anomaly is at the top left, which is 412 pixels wide.", ONE, "How big is it?")
    assert guard("The image looks normal, no anomaly was found.", NORMAL, "Is it fine?")


def test_factual_answers_are_grounded():
    assert "412 px" in factual_answer(ONE, "How big is it?") and "6.44 mm²" in factual_answer(ONE, "How big?")
    assert factual_answer(TWO, "Where are they?") == "The anomalies are at the top left and bottom right of the image."
    assert "150 px" in factual_answer(TWO, "How large are they?")
    assert "93%" in factual_answer(ONE, "How sure are you?")
    assert factual_answer(NORMAL, "Where is it?").startswith("No, there is no anomaly")
    for verdict in (ONE, TWO, NORMAL):
        for question in ("Where is it?", "How big is it?", "How sure are you?", "What happened?"):
            assert guard(factual_answer(verdict, question), verdict, question), (verdict, question)


def test_default_gguf_loads_offline(lvlm):
    assert default_llm_path().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert lvlm.image_projection.out_features == lvlm.llm.config.hidden_size == 576
    image, prompts = lvlm.soft_tokens([scored(ONE), scored(NORMAL, 1)])
    assert image.shape == (2, 1, 576) and prompts.shape == (2, 18, 576)
    text = lvlm.chat_text(ONE, "Where is it?", [])
    assert "<Img>" in text and "</Img>" in text and "top left" in text and "412 px" in text
    assert lvlm.embed_chat(text, image[0], prompts[0]).shape[1] == 576


def test_first_answers_agree_with_verdicts(lvlm):
    frames = [scored(ONE), scored(TWO, 1), scored(NORMAL, 2)]
    answers = lvlm.answer(frames)
    assert answers == [first_answer(v) for v in (ONE, TWO, NORMAL)]
    assert lvlm.answer(frames, FIRST_QUESTION) == answers


def test_batched_multi_turn_follow_ups_are_grounded(lvlm):
    frames = [scored(ONE), scored(TWO, 1), scored(NORMAL, 2), scored(ONE, 3)]
    questions = ["How big is it?", "Where are they?", "Where is it?", "How sure are you?"]
    histories = [[(FIRST_QUESTION, first_answer(f.verdict))] for f in frames]
    answers = lvlm.answer(frames, questions, histories)                 # one generate call for all four
    assert len(answers) == len(frames)
    for frame, question, answer in zip(frames, questions, answers, strict=True):
        assert guard(answer, frame.verdict, question), (question, answer)
    assert "412" in answers[0] or "6.44" in answers[0]
    assert "top left" in answers[1] and "bottom right" in answers[1]
    assert "anomaly" in answers[2].lower() and not any(p in answers[2] for p in ("top", "left", "bottom"))
    assert "93%" in answers[3]
    # a longer history still fits, and the answer stays bound to the verdict
    longer = [*histories[0], ("How big is it?", answers[0])]
    [again] = lvlm.answer([frames[0]], ["Where is it?"], [longer])
    assert "top left" in again and guard(again, ONE, "Where is it?")


def test_inspection_model_answers_match_its_verdicts(lvlm):
    model = InspectionModel(ModelConfig(device="cpu"))
    sim = LineSimulator(size=64)
    model.add_references("disc", sim.normal_references("disc", 2))
    parts = [sim.part(1, product="disc", defect_type="scratch"), sim.part(2, product="disc", defect_type=None)]
    results = model.score([(p.product, p.image) for p in parts])
    answers = model.answer(results)                                     # first answers: no generation
    for result, answer in zip(results, answers, strict=True):
        assert answer.startswith("Yes") == result.is_anomalous
        assert answer == first_answer(result.verdict)
    assert model.lvlm.llm is lvlm.llm                                   # the frozen LLM is loaded once


def save_tiny_llama(path) -> str:
    """A random 2-layer Llama with a byte-level BPE tokenizer (no chat template), saved to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["Is there any anomaly in the image?", "Yes, at the top left of the image."], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_tiny_llama_directory_loads_through_the_same_path(tmp_path):
    path = save_tiny_llama(tmp_path / "tiny-llama")
    lvlm = AnomalyLVLM(LvlmConfig(llm=path, max_new_tokens=6), embed_dim=EMBED_DIM)
    assert lvlm.image_projection.out_features == 32
    assert "### Human: <Img>" in lvlm.chat_text(ONE, "Where is it?", [])   # AnomalyGPT's format, no template
    frames = [scored(ONE), scored(NORMAL, 1)]
    questions = ["How big is it?", "Where is it?"]
    answers = lvlm.answer(frames, questions)
    # a random LM says nothing useful, so the guard answers from the verdict
    assert answers == [factual_answer(ONE, questions[0]), factual_answer(NORMAL, questions[1])]
    raw = AnomalyLVLM(LvlmConfig(llm=path, max_new_tokens=6, guard=False), embed_dim=EMBED_DIM)
    assert all(isinstance(a, str) for a in raw.answer(frames, questions))


# --- multi-turn, determinism and batching of the raw LLM replies (before the guard) -----------------

HISTORY = [(FIRST_QUESTION, first_answer(ONE)), ("What colour is the part?", "The part is grey.")]


def test_follow_up_prompt_carries_the_history_to_the_llm(lvlm, monkeypatch):
    monkeypatch.setattr(lvlm.config, "max_new_tokens", 8)                  # short replies: CPU time
    question = "Where is it?"
    fresh, followed = lvlm.chat_text(ONE, question, []), lvlm.chat_text(ONE, question, HISTORY)
    assert fresh.count("<|im_start|>user") == 1 and followed.count("<|im_start|>user") == 3
    assert followed.count("<|im_start|>assistant") == 3                   # 2 earlier answers + the generation prompt
    assert "The part is grey." in followed and "The part is grey." not in fresh
    # the turns in order; the soft image tokens only in the first user turn
    order = [followed.index(IMAGE_SLOT), followed.index(FIRST_QUESTION), followed.index("What colour is the part?"),
             followed.index("The part is grey."), followed.rindex(question)]
    assert order == sorted(order) and followed.count(IMAGE_SLOT) == followed.count(PROMPT_SLOT) == 1

    seen = []
    generate = lvlm.llm.generate

    def spy(**kwargs):
        seen.append(kwargs["inputs_embeds"].detach().clone())
        return generate(**kwargs)

    monkeypatch.setattr(lvlm.llm, "generate", spy)
    frame = scored(ONE)
    [without] = lvlm.generate([frame], [question], [[]])
    [with_history] = lvlm.generate([frame], [question], [HISTORY])
    [again] = lvlm.generate([frame], [question], [HISTORY])
    image, prompts = lvlm.soft_tokens([frame])
    lengths = [len(lvlm.embed_chat(text, image[0], prompts[0])) for text in (fresh, followed, followed)]
    assert [tuple(x.shape[:2]) for x in seen] == [(1, n) for n in lengths]
    grown = len(lvlm.tokenizer(followed).input_ids) - len(lvlm.tokenizer(fresh).input_ids)
    assert seen[1].shape[1] - seen[0].shape[1] == grown > 10
    # the earlier answer's word embeddings are in what the LLM is fed
    ids = lvlm.tokenizer("The part is grey.", add_special_tokens=False).input_ids
    words = lvlm.embed_tokens(torch.tensor(ids))
    fed = seen[1][0]
    assert any(torch.equal(fed[i:i + len(ids)], words) for i in range(fed.shape[0] - len(ids) + 1))
    assert not any(torch.equal(seen[0][0][i:i + len(ids)], words) for i in range(seen[0].shape[1] - len(ids) + 1))
    assert torch.equal(seen[1], seen[2])
    assert with_history == again                                          # greedy: same inputs, same reply
    assert with_history != without                                        # the history changes what it says


def test_batched_generation_equals_one_frame_at_a_time(lvlm, monkeypatch):
    """Left padding is masked and positions restart after it: a frame's reply does not depend on its batch."""
    monkeypatch.setattr(lvlm.config, "max_new_tokens", 8)
    frames = [scored(ONE), scored(TWO, 1)]
    questions = ["How big is it?", "Where are they?"]
    histories = [HISTORY, []]                                            # different lengths: one is padded
    lengths = [len(lvlm.tokenizer(lvlm.chat_text(f.verdict, q, h)).input_ids)
               for f, q, h in zip(frames, questions, histories, strict=True)]
    assert lengths[0] != lengths[1]
    batched = lvlm.generate(frames, questions, histories)
    alone = [lvlm.generate([f], [q], [h])[0] for f, q, h in zip(frames, questions, histories, strict=True)]
    assert batched == alone
    assert all(isinstance(reply, str) and reply for reply in batched)


def test_untrained_adapters_are_the_same_in_every_run(lvlm):
    """The image projection and prompt learner are seeded: raw replies do not vary from run to run."""
    torch.manual_seed(1234)
    other = AnomalyLVLM(LvlmConfig(max_new_tokens=12), embed_dim=EMBED_DIM)
    assert other.llm is lvlm.llm                                          # the frozen LLM is cached
    after = torch.rand(1)
    frames = [scored(ONE), scored(NORMAL, 1)]
    for ours, theirs in zip(lvlm.soft_tokens(frames), other.soft_tokens(frames), strict=True):
        assert torch.equal(ours, theirs)
    assert torch.equal(other.image_projection.weight, lvlm.image_projection.weight)
    torch.manual_seed(1234)
    assert torch.equal(torch.rand(1), after)                              # the caller's random state is untouched
    reseeded = AnomalyLVLM(LvlmConfig(max_new_tokens=12, seed=1), embed_dim=EMBED_DIM)
    assert not torch.equal(reseeded.image_projection.weight, lvlm.image_projection.weight)
