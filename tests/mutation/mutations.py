"""The fixed list of semantic mutations run by `tests/mutation/run.py`.

Each is one textual edit of the library (`old` must occur exactly once in `path`) that changes
what a method, loss, metric or the training loop computes — the kind of slip a reviewer could miss
and the suite must catch — with the tests that should catch it (pytest node ids or files).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str


REF = "tests/test_references.py"
GOLD = "tests/test_golden.py"
DEEP = f"{REF}::test_deep_prompts_match_reference"
LAMM = f"{REF}::test_lamm_loss_terms_match_reference"
MMA = f"{REF}::test_mma_matches_reference"
DETAILS = "tests/test_method_details.py"
TRAIN = "tests/test_train.py"
PSRC = "fastprompt/methods/promptsrc.py"
SRC_SUM = 'return terms["ce"] + (terms["kl"] + terms["text_l1"] + terms["image_l1"]), logits'
PSRC_REF_FILE, PSRC_GOLD_FILE = "tests/test_references_promptsrc.py", "tests/test_golden_promptsrc.py"
PSRC_REF = f"{PSRC_REF_FILE}::test_promptsrc_loss_and_gradients_match_reference"
PSRC_GOLD = f"{PSRC_GOLD_FILE}::test_golden_loss_each_term_and_every_gradient"
GPA, ORIG_SRC = "tests/test_gpa.py", "tests/test_original_src.py"


LORA_REF = "tests/test_references_clip_lora.py"
LORA = "tests/test_clip_lora.py"
LORA_GOLD = "tests/test_golden_cliplora.py"
LORA_MATH = f"{LORA_REF}::test_clip_lora_matches_reference"
LORA_DROP = f"{LORA_REF}::test_clip_lora_dropout_draws_the_release_masks"


def lora_golden(*tests: str) -> tuple[str, ...]:
    return tuple(f"{LORA_GOLD}::test_golden_cliplora_{t}" for t in tests)


def golden(*names: str) -> tuple[str, ...]:
    return tuple(f"{GOLD}::{t}[{n}]" for n in names
                 for t in ("test_golden_eval_logits", "test_golden_training_loss_and_grads"))


MUTATIONS = [
    # ---------------------------------------------------------------- CoOp, CoCoOp
    Mutation("coop-context-over-sos", "fastprompt/methods/coop.py",
             "return insert_rows(template.embeddings, self.context_for(template), 1)",
             "return insert_rows(template.embeddings, self.context_for(template), 0)",
             (f"{REF}::test_coop_matches_reference", *golden("coop")), "context written over SOS"),
    Mutation("cocoop-shift-subtracted", "fastprompt/methods/cocoop.py",
             "ctx = self.ctx + self.meta_net(img).unsqueeze(1)",
             "ctx = self.ctx - self.meta_net(img).unsqueeze(1)",
             (f"{REF}::test_cocoop_matches_reference", *golden("cocoop")), "meta-net shift subtracted"),
    # ---------------------------------------------------------------- MaPLe, IVLP, prompt slots
    Mutation("maple-couplings-reversed", "fastprompt/methods/maple.py",
             "zip(self.deep_text, self.deep_proj)", "zip(self.deep_text, self.deep_proj[::-1])",
             (DEEP, *golden("maple")), "deep coupling layers wired in reverse order"),
    Mutation("maple-shallow-coupling-detached", "fastprompt/methods/maple.py",
             "prompts = {0: self.proj(self.ctx)}", "prompts = {0: self.proj(self.ctx.detach())}",
             (DEEP, *golden("maple")), "no gradient from the vision prompt into the text context"),
    Mutation("deep-text-prompts-one-layer-late", "fastprompt/methods/maple.py",
             "TowerHooks(prompts={i + 1: p for i, p in enumerate(self.deep_text)})",
             "TowerHooks(prompts={i + 2: p for i, p in enumerate(self.deep_text)})",
             (DEEP, *golden("maple")), "deep text prompt i at block i+2"),
    Mutation("ivlp-vision-prompts-one-layer-late", "fastprompt/methods/maple.py",
             "TowerHooks(prompts={i: p for i, p in enumerate(self.vision)})",
             "TowerHooks(prompts={i + 1: p for i, p in enumerate(self.vision)})",
             (DEEP,), "IVLP's shallow vision prompt used at block 1, the others one block late"),
    Mutation("text-prompts-over-sos", "fastprompt/backbone.py",
             "opts: RunOptions = RunOptions(), prompt_start: int = 1,",
             "opts: RunOptions = RunOptions(), prompt_start: int = 0,",
             (DEEP, *golden("maple")), "deep text prompts at rows 0..n-1 instead of 1..n"),
    Mutation("vision-deep-prompts-after-cls", "fastprompt/backbone.py",
             "start = x.shape[1] - p.shape[-2] if p is not None else 0",
             "start = 1 if p is not None else 0",
             (DEEP, *golden("maple")), "deep vision prompts over the first patches, not the last rows"),
    Mutation("vision-shallow-prompts-before-patches", "fastprompt/backbone.py",
             "x = torch.cat([x, shallow], dim=1)", "x = torch.cat([x[:, :1], shallow, x[:, 1:]], dim=1)",
             (DEEP, *golden("maple")), "shallow vision prompts inserted after CLS, not appended"),
    # ---------------------------------------------------------------- MMA
    Mutation("mma-adapter-reads-x", "fastprompt/backbone.py",
             "y = adapter(h, y, fused=opts.kernels)", "y = adapter(x, y, fused=opts.kernels)",
             (MMA, *golden("mma")), "adapter fed x instead of ln_1(x)"),
    Mutation("mma-adapters-one-layer-late", "fastprompt/methods/mma.py",
             "int(k) - 1: Adapter(", "int(k): Adapter(",
             (MMA, *golden("mma")), "adapter k at block k (the top one dropped)"),
    Mutation("mma-tower-scales-swapped", "fastprompt/methods/mma.py",
             "return self._hooks(self.text_adapter, self.config.text_scale)",
             "return self._hooks(self.text_adapter, self.config.vision_scale)",
             (MMA,), "text adapters scaled by the vision scale"),
    Mutation("mma-no-gradient-scale", "fastprompt/methods/mma.py",
             "b.up, scale, self.config.grad_scale)", "b.up, scale, False)",
             (MMA, f"{DETAILS}::test_mma_gradient_scale_rule", *golden("mma")),
             "the gradient-scale rule ignored"),
    # ---------------------------------------------------------------- LAMM
    Mutation("lamm-feature-term-sign", "fastprompt/methods/lamm.py",
             "loss = loss + several * cfg.feature_weight * (1 - cos).mean()",
             "loss = loss - several * cfg.feature_weight * (1 - cos).mean()",
             (LAMM, *golden("lamm")), "feature term subtracted"),
    Mutation("lamm-mask-needs-all-different", "fastprompt/methods/lamm.py",
             "several = (labels != labels[:1]).any()", "several = (labels != labels[:1]).all()",
             (LAMM,), "feature term only when no label repeats the first"),
    Mutation("lamm-mask-dropped", "fastprompt/methods/lamm.py",
             "several = (labels != labels[:1]).any()", "several = (labels == labels).any()",
             (LAMM,), "feature term also for one-label batches"),
    Mutation("lamm-distillation-reversed", "fastprompt/methods/lamm.py",
             "soft = F.cross_entropy(fixed / T, F.softmax(logits / T, dim=-1))",
             "soft = F.cross_entropy(logits / T, F.softmax(fixed / T, dim=-1))",
             (LAMM, *golden("lamm")), "distillation direction swapped"),
    Mutation("lamm-detach-direction", "fastprompt/methods/lamm.py",
             "cos = F.cosine_similarity(t[labels], t0[labels].detach(), dim=-1)",
             "cos = F.cosine_similarity(t[labels].detach(), t0[labels], dim=-1)",
             (LAMM, *golden("lamm")), "stop-gradient on the learned side instead of t0"),
    Mutation("lamm-distillation-teacher-detached", "fastprompt/methods/lamm.py",
             "logits, fixed = self.logits_from(img, t), self.logits_from(img, t0)",
             "logits, fixed = self.logits_from(img, t), self.logits_from(img, t0.detach())",
             (LAMM, *golden("lamm_coop")), "t0 detached in the logit term (the original detaches neither)"),
    Mutation("lamm-param-weight-ignores-shots", "fastprompt/methods/lamm.py",
             "return 1.0 / self.shots if self.param_weight is None", "return 1.0 if self.param_weight is None",
             (LAMM, *golden("lamm")), "parameter term weighted 1 instead of 1/shots"),
    Mutation("lamm-temperature-not-squared", "fastprompt/methods/lamm.py",
             "cfg.logit_weight * T * T * soft", "cfg.logit_weight * T * soft",
             (LAMM, *golden("lamm")), "logit term weighted T instead of T^2"),
    Mutation("lamm-unseen-classes-get-learned-rows", "fastprompt/methods/lamm.py",
             "torch.where(known[:, None, None], learned, own)", "torch.where(known[:, None, None], own, learned)",
             (f"{DETAILS}::test_lamm_label_rows_and_unseen_classes",), "learned and original rows swapped"),
    # ---------------------------------------------------------------- PromptSRC, GPA, KgCoOp
    Mutation("promptsrc-kl-sign", PSRC, SRC_SUM, SRC_SUM.replace('(terms["kl"]', '(-terms["kl"]'),
             (PSRC_REF, PSRC_GOLD), "the KL term subtracted"),
    Mutation("promptsrc-text-l1-sign", PSRC, SRC_SUM,
             SRC_SUM.replace('+ terms["text_l1"]', '- terms["text_l1"]'),
             (PSRC_REF, PSRC_GOLD), "the text L1 term subtracted"),
    Mutation("promptsrc-image-l1-sign", PSRC, SRC_SUM,
             SRC_SUM.replace('+ terms["image_l1"]', '- terms["image_l1"]'),
             (PSRC_REF, PSRC_GOLD), "the image L1 term subtracted"),
    Mutation("promptsrc-kl-batchmean", PSRC, "log_target=True) / logits.numel()",
             "log_target=True) / logits.shape[0]",
             (PSRC_REF, PSRC_GOLD), "KL divided by B (batchmean), not by B*C as the code"),
    Mutation("promptsrc-teacher-normalised-per-template", "fastprompt/methods/base.py",
             "parts.append(torch.stack(feats, dim=1).mean(dim=1))",
             "parts.append(F.normalize(torch.stack(feats, dim=1), dim=-1).mean(dim=1))",
             (f"{PSRC_REF_FILE}::test_promptsrc_text_teacher_is_the_unnormalised_mean",
              f"{PSRC_GOLD_FILE}::test_golden_teachers"), "each template normalised before the mean"),
    Mutation("promptsrc-image-teacher-prompted", PSRC,
             "return self.backbone.encode_image(images, NO_HOOKS, self.opts)",
             "return self.backbone.encode_image(images, self.image_hooks(), self.opts)",
             (PSRC_REF, PSRC_GOLD), "the image teacher runs with the prompts on"),
    Mutation("promptsrc-detected-as-ivlp", PSRC, "precedence=15,", "precedence=25,",
             (f"{ORIG_SRC}::test_promptsrc_and_ivlp_files_are_told_apart",),
             "IVLP's detector runs first: a PromptSRC file is taken for IVLP"),
    Mutation("gpa-weight-of-previous-epoch", PSRC,
             "w = gpa_weights(self.config.gpa_mean, self.config.gpa_std, epochs)[epoch]",
             "w = gpa_weights(self.config.gpa_mean, self.config.gpa_std, epochs)[epoch - 1]",
             (f"{GPA}::test_the_saved_model_is_the_weighted_sum_of_the_epochs",
              f"{PSRC_GOLD_FILE}::test_golden_gpa_average_of_a_real_run"),
             "each epoch weighted by its predecessor's weight"),
    Mutation("gpa-std-as-variance", PSRC, "np.exp(-0.5 * ((e - mean) / std) ** 2)",
             "np.exp(-0.5 * ((e - mean) / std ** 2) ** 2)",
             (f"{GPA}::test_weights_are_the_normalised_gaussian",
              f"{PSRC_GOLD_FILE}::test_golden_gpa_weights_of_every_recipe"),
             "GPA_STD read as a variance"),
    Mutation("gpa-average-not-applied", PSRC, "p.copy_(self._gpa[name])", "pass",
             (f"{GPA}::test_the_saved_model_is_the_weighted_sum_of_the_epochs",),
             "the last epoch saved, not the average"),
    Mutation("gpa-sum-not-checkpointed", PSRC, "        if not self._gpa:\n            return {}\n",
             "        return {}\n",
             (f"{GPA}::test_a_run_killed_and_resumed_ends_with_the_same_average",),
             "a resumed run loses the running sum"),
    Mutation("kgcoop-kg-sign", "fastprompt/methods/kgcoop.py", 'return terms["ce"] + terms["kg"], logits',
             'return terms["ce"] - terms["kg"], logits',
             ("tests/test_references_kgcoop.py",
              "tests/test_golden_kgcoop.py::test_golden_logits_loss_terms_teacher_and_gradient"),
             "the knowledge-guidance term subtracted"),
    Mutation("kgcoop-dtd-teacher-is-coops", "fastprompt/methods/kgcoop.py",
             '"dtd": "a photo of a {}, a type of texture.",', '"dtd": "{} texture.",',
             (f"{ORIG_SRC}::test_kgcoop_release_file_imports_with_a_note",),
             "CoOp's DTD prompt instead of KgCoOp's"),
    Mutation("kgcoop-teacher-ignores-the-dataset", "fastprompt/jobs.py",
             "        options.setdefault(key, value)\n", "        pass\n",
             ("tests/test_src_cli.py::test_kgcoop_cli_teacher_follows_the_dataset_and_one_small_batch",),
             "fit leaves KgCoOp's teacher at the generic prompt"),
    Mutation("loader-always-drops-the-last-batch", "fastprompt/training.py",
             "drop_last=len(dataset) >= batch_size", "drop_last=True",
             ("tests/test_src_cli.py::test_kgcoop_cli_teacher_follows_the_dataset_and_one_small_batch",),
             "fewer images than a batch train on nothing (Dassl trains one smaller batch)"),
    # ---------------------------------------------------------------- CLIP-LoRA, weight-delta slots
    Mutation("lora-scale-alpha-over-r", "fastprompt/methods/clip_lora.py",
             "self.scale = config.alpha / math.sqrt(config.r)", "self.scale = config.alpha / config.r",
             (LORA_MATH, *lora_golden("eval_logits_merged", "training_dropout_off[fast]")),
             "loralib's scaling alpha/r instead of the release's alpha/sqrt(r)"),
    Mutation("lora-fast-deltas-on-other-rows", "fastprompt/lora.py",
             'blocks = [self.B[p] if p in self.A else h.new_zeros(d, 0) for p in "qkv"]',
             'blocks = [self.B[p] if p in self.A else h.new_zeros(d, 0) for p in "kqv"]',
             (LORA_MATH, *lora_golden("training_dropout_off[fast]")),
             "fast path: the q branch lands on the k rows and the k branch on the q rows"),
    Mutation("lora-release-path-rows-swapped", "fastprompt/lora.py",
             'for j, p in enumerate("qkv"):\n                rows = slice(j * d, (j + 1) * d)',
             'for j, p in enumerate("kqv"):\n                rows = slice(j * d, (j + 1) * d)',
             (LORA_MATH, *lora_golden("training_dropout_off[plain]")),
             "kernels off: each projection's delta paired with the other's frozen rows"),
    Mutation("lora-dropout-on-the-frozen-path", "fastprompt/lora.py",
             "y = F.linear(h, w[rows], None if b is None else b[rows])",
             "y = F.linear(self.dropped(p, h) if p in self.A else h, w[rows], None if b is None else b[rows])",
             (LORA_DROP, *lora_golden("training_dropout_on[plain]")),
             "dropout on the whole projection's input, not the low-rank branch's only"),
    Mutation("lora-merge-subtracts", "fastprompt/lora.py",
             "in_proj = torch.cat([r + (self.B[p] @ self.A[p]) * self.scale", "in_proj = torch.cat([r - (self.B[p] @ self.A[p]) * self.scale",
             (LORA_MATH, f"{LORA}::test_merged_equals_unmerged_and_costs_what_plain_clip_costs",
              *lora_golden("eval_logits_merged")), "merged weights W - s·B@A"),
    Mutation("lora-merged-out-proj-ignored", "fastprompt/lora.py",
             "        if self.out_proj is None:\n            return attn.out_proj(o)",
             "        if True:\n            return attn.out_proj(o)",
             (LORA_MATH, f"{LORA}::test_merged_equals_unmerged_and_costs_what_plain_clip_costs"),
             "inference forgets the o delta"),
    Mutation("lora-dropout-mask-ignored", "fastprompt/lora.py",
             "return torch.where(self.masks[p], x, 0.0)", "return x",
             (LORA_DROP, *lora_golden("training_dropout_on[fast]")), "dropout only rescales the branch input"),
    Mutation("lora-one-mask-for-every-projection", "fastprompt/lora.py",
             "return torch.where(self.masks[p], x, 0.0)", 'return torch.where(self.masks["q"], x, 0.0)',
             (LORA_DROP, *lora_golden("training_dropout_on[fast]")), "q, k and v share one dropout mask"),
    Mutation("lora-masks-drawn-batch-first", "fastprompt/lora.py",
             "noise = torch.empty(length, rows, width, device=device).bernoulli_(1.0 - slot.dropout)\n"
             "                masks[p] = noise[:keep].transpose(0, 1).to(torch.bool,",
             "noise = torch.empty(rows, length, width, device=device).bernoulli_(1.0 - slot.dropout)\n"
             "                masks[p] = noise[:, :keep].to(torch.bool,",
             (LORA_DROP, *lora_golden("training_dropout_on[fast]")),
             "masks drawn in the batch-first layout, not the release's sequence-first one"),
    Mutation("lora-text-masks-at-the-truncated-length", "fastprompt/backbone.py",
             "with_masks(hooks, emb.shape[0], emb.shape[1], keep, emb.device)",
             "with_masks(hooks, emb.shape[0], keep, keep, emb.device)",
             (LORA_DROP, f"{LORA}::test_dropout_masks_do_not_depend_on_the_runtime_switches",
              *lora_golden("training_dropout_on[fast]")),
             "text masks drawn for the cut sequence: other draws than the release's 77-token ones"),
    Mutation("lora-image-tower-first", "fastprompt/methods/clip_lora.py",
             "        text = self.text_features()  # first: run_lora encodes the text, then the images\n"
             "        return self.logits_from(self.image_features(images), text)",
             "        return self.logits_from(self.image_features(images), self.text_features())",
             (LORA_DROP, *lora_golden("training_dropout_on[fast]")),
             "the image tower draws its masks before the text tower"),
    Mutation("lora-logit-scale-of-clip", "fastprompt/methods/clip_lora.py",
             "        return LOGIT_SCALE", "        return self.backbone.logit_scale()",
             (LORA_MATH,), "exp(logit_scale) instead of the release's 100"),
    Mutation("lora-file-vision-blocks-first", "fastprompt/methods/clip_lora.py",
             'for t in ("text", "vision") for i in getattr(self, t)]', 'for t in ("vision", "text") for i in getattr(self, t)]',
             (f"{LORA}::test_lora_weights_written_by_hand_text_first", *lora_golden("released_file_imported")),
             "lora_weights.pt's layer_k numbered from the vision tower"),
    Mutation("classifier-ignores-merged-weights", "fastprompt/classifier.py",
             "self._merged_layers = sorted(hooks.lora)", "self._merged_layers = []",
             ("tests/test_methods.py::test_classifier_equals_forward[clip_lora]",
              f"{LORA}::test_merged_equals_unmerged_and_costs_what_plain_clip_costs"),
             "the classifier (inference, export) runs plain CLIP's image tower"),
    Mutation("epochs-ignored-under-a-step-budget", "fastprompt/recipes.py",
             'given["iterations_per_shot"] = 0', "pass",
             (f"{LORA}::test_the_released_recipe_in_every_protocol",), "--epochs has no effect on CLIP-LoRA"),
    # ---------------------------------------------------------------- shared logits
    Mutation("logit-scale-dropped", "fastprompt/methods/base.py",
             "return self.logit_scale() * image_features @ text_features.t()",
             "return image_features @ text_features.t()",
             (f"{REF}::test_coop_matches_reference", *golden("coop")), "cosine logits without exp(logit_scale)"),
    # ---------------------------------------------------------------- metrics
    Mutation("hm-is-arithmetic-mean", "fastprompt/scoring.py",
             "2 * base * novel / (base + novel)", "(base + novel) / 2",
             ("tests/test_metrics.py",), "harmonic mean replaced by the arithmetic mean"),
    Mutation("accuracy-argmin", "fastprompt/scoring.py",
             "correct += int((logits.argmax(-1) == labels).sum())",
             "correct += int((logits.argmin(-1) == labels).sum())",
             ("tests/test_metrics.py",), "argmin instead of argmax"),
    Mutation("accuracy-last-batch-only", "fastprompt/scoring.py",
             "correct += int((logits.argmax(-1) == labels).sum())",
             "correct = int((logits.argmax(-1) == labels).sum())",
             ("tests/test_metrics.py",), "correct count overwritten per batch"),
    # ---------------------------------------------------------------- training loop
    Mutation("ddp-without-sampler", "fastprompt/training.py",
             "    if env.world_size > 1:\n        sampler = DistributedSampler(",
             "    if False:\n        sampler = DistributedSampler(",
             ("tests/test_ddp.py",), "every rank trains on the whole dataset"),
    Mutation("ddp-same-order-every-epoch", "fastprompt/training.py",
             "sampler.set_epoch(epoch)", "sampler.set_epoch(0)",
             ("tests/test_ddp.py",), "the distributed sampler never reshuffles"),
    Mutation("ddp-not-wrapped", "fastprompt/training.py",
             "return nn.parallel.DistributedDataParallel(step, device_ids=ids)", "return step",
             ("tests/test_ddp.py",), "each rank trains on its own, gradients never averaged"),
    Mutation("schedule-not-applied", "fastprompt/training.py",
             'group["lr"] = lr', "pass",
             ("tests/test_training_loop.py",), "the optimiser keeps the base rate (no warm-up, no cosine)"),
    Mutation("sgd-momentum-weight-decay-swapped", "fastprompt/optim.py",
             "momentum=recipe.momentum,\n                           weight_decay=recipe.weight_decay)",
             "momentum=recipe.weight_decay,\n                           weight_decay=recipe.momentum)",
             ("tests/test_training_loop.py",), "SGD built with momentum and weight decay swapped"),
    Mutation("grads-accumulate", "fastprompt/training.py",
             "optimizer.zero_grad(set_to_none=True)", "pass",
             (f"{TRAIN}::test_resume_continues_a_killed_run_exactly", "tests/test_ddp.py"),
             "gradients never cleared between steps"),
    Mutation("nan-check-dropped", "fastprompt/training.py",
             "finite &= torch.isfinite(loss.detach())", "finite &= torch.isfinite(loss.detach()) | True",
             (f"{TRAIN}::test_nan_loss_stops_with_clear_error_and_keeps_checkpoint",),
             "a NaN loss is not noticed"),
    Mutation("resume-without-momentum", "fastprompt/optim.py",
             'state[MOMENTUM] = tensors[f"momentum/{name}"]', "pass",
             (f"{TRAIN}::test_resume_continues_a_killed_run_exactly",), "resume restarts SGD momentum"),
    Mutation("resume-without-adamw-state", "fastprompt/resume.py",
             "restore_optimizer(model, optimizer, tensors, path)", "pass",
             ("tests/test_training_recipes.py::test_adamw_run_killed_and_resumed_equals_the_whole_run",),
             "resume restarts AdamW's moments"),
    Mutation("cosine-per-epoch-not-per-step", "fastprompt/recipes.py",
             'if self.schedule == "epoch":', "if True:",
             ("tests/test_training_recipes.py::test_adamw_cosine_per_iteration_and_a_step_budget",),
             "a per-iteration schedule stepped once an epoch"),
    Mutation("step-budget-ignored", "fastprompt/training.py",
             "if step == n_steps:", "if False:",
             ("tests/test_training_recipes.py::test_a_budget_ends_inside_an_epoch",),
             "the last epoch of a step budget runs whole"),
    Mutation("method-training-state-not-restored", "fastprompt/resume.py",
             "model.load_training_state(state, path)", "pass",
             ("tests/test_training_recipes.py::test_method_hooks_and_their_state_survive_a_resume",),
             "a resumed run forgets the method's running sums (GPA)"),
    Mutation("augmentation-seed-ignores-epoch", "fastprompt/training.py",
             "torch.manual_seed(epoch_seed(env.seed, epoch))", "torch.manual_seed(epoch_seed(env.seed, 0))",
             ("tests/test_training_loop.py", f"{TRAIN}::test_resume_continues_a_killed_run_exactly"),
             "the same augmentation every epoch"),
    # ---------------------------------------------------------------- kernels inside models
    Mutation("kernel-adapter-drops-up-bias", "kernels/adapter.py",
             "o = yv.to(tl.float32) + scale * (f + bu[None, :])", "o = yv.to(tl.float32) + scale * f",
             ("tests/test_interpreted_fast_path.py",), "Triton adapter forgets the up-projection bias"),
    Mutation("kernel-insert-ignores-prompts", "kernels/insert_layernorm.py",
             "v = tl.where(is_p[:, None], _cvt(pv, act, EMU), xv)", "v = xv",
             ("tests/test_interpreted_fast_path.py",), "Triton insertion leaves the prompt rows out"),
]
