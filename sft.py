"""The SFT block: teach the output format <think> plan </think><proof> quotes </proof><answer> answer </answer>.

Tunix's PeftTrainer on a GRPO block's LoRA policy and optimizer (grpo.py), the loss on the response tokens only,
examples in the published row order. build(): all but the training (tests read it); run(): train, -> last step."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import data
import runs
from grpo import load_policy, load_rows, make_optimizer

log = logging.getLogger("train")


def sft_model_inputs(x):
    """TrainingInput -> the arguments of Tunix's default loss (positions, causal mask)."""
    from tunix.sft import utils
    pad_mask = x.input_tokens != 0
    return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
            "positions": utils.build_positions_from_mask(pad_mask),
            "attention_mask": utils.make_causal_attn_mask(pad_mask)}


def sft_loss(model, input_tokens, input_mask, positions, attention_mask, chunk_size: int, remat: str):
    """Tunix's SFT loss (mean NLL of the response tokens, input_mask 1) without its float32 [batch, length,
    262,144] logits (2.1 GB per copy at the published 2 x 1,024): grpo_loss.py's pieces; same value (tested)."""
    from grpo_loss import chunked_token_logps, hidden_states, rematerialized, unembedding
    model = rematerialized(model, remat)
    hidden = hidden_states(model, input_tokens, positions, attention_mask)[:, :-1]
    mask = input_mask[:, 1:].astype("float32")  # position t predicts token t+1; only these are computed
    logps = chunked_token_logps(unembedding(model), hidden, input_tokens[:, 1:], chunk_size, mask=mask)
    return -(logps * mask).sum() / (mask.sum() + 1e-8)


def sft_trainer(policy, config: dict, training, optimizer):
    """Tunix's PeftTrainer for the LoRA policy: our optimizer, inputs and (--logps-chunk-size) loss."""
    from tunix.sft import peft_trainer
    trainer = peft_trainer.PeftTrainer(policy, optimizer, training).with_gen_model_input_fn(sft_model_inputs)
    if config["logps_chunk_size"]:  # the same loss, without the full-vocabulary logits
        chunk_size, remat = config["logps_chunk_size"], config["remat"]

        # Tunix passes the inputs by name, and nnx.value_and_grad needs them as named parameters.
        def loss(model, input_tokens, input_mask, positions, attention_mask):
            return sft_loss(model, input_tokens, input_mask, positions, attention_mask, chunk_size, remat)

        trainer = trainer.with_loss_fn(loss)
    return trainer


def build(config: dict, run_dir: Path, new_run: dict | None = None) -> dict:
    """Everything an SFT block hands to Tunix (new_run: runs.prepare_run_dir's metadata, written once loaded)."""
    from tunix.sft import peft_trainer
    rows = load_rows(config)
    policy, tokenizer, mesh = load_policy(config)
    log.info("SFT on %d examples of %s; model %s, %s", len(rows), config["dataset"],
             config["model"], config["dtype"])
    examples = data.sft_token_rows(rows, tokenizer, config["max_seq_length"])  # DataError: train.one_line's one line
    if new_run is not None:
        runs.prepare_run_dir(run_dir, new_run)
    batches = data.prompt_order(examples, config["batch_size"], config["shuffle_seed"])
    a = config["gradient_accumulation_steps"]  # several processes: each feeds the whole batch (grpo.load_policy)
    runs.check_inputs_agree(config, [[batches[i * a + j] for j in range(a)] for i in range(config["max_steps"])],
                            config["start_step"])
    batches = batches.map(lambda b: peft_trainer.TrainingInput(**b))
    optimizer, schedule = make_optimizer(config)
    metrics = runs.MetricsLog(run_dir, config, schedule)
    training = peft_trainer.TrainingConfig(
        max_steps=config["max_steps"], eval_every_n_steps=10 ** 9,
        gradient_accumulation_steps=config["gradient_accumulation_steps"], metrics_prefix="actor",  # as in GRPO
        metrics_logging_options=metrics.options(run_dir), **runs.checkpointing(config, run_dir / "checkpoints"))
    # PeftTrainer reads the mesh from the `with mesh:` context, which jax now calls deprecated.
    with warnings.catch_warnings(action="ignore", category=DeprecationWarning), mesh, runs.restoring(run_dir / "checkpoints"):
        trainer = sft_trainer(policy, config, training, optimizer)  # a resume: Tunix restores the latest checkpoint
    runs.rows_before_checkpoints(metrics, trainer)  # a killed run keeps every step's row
    return dict(trainer=trainer, training=training, batches=batches, rows=rows, policy=policy, tokenizer=tokenizer,
                mesh=mesh, metrics=metrics)


def run(config: dict, run_dir: Path, stop_after: int | None = None, new_run: dict | None = None) -> int:
    block = build(config, run_dir, new_run)
    trainer, training, metrics = block["trainer"], block["training"], block["metrics"]
    metrics.start(trainer.train_steps)  # > 0 when resuming: Tunix restored the checkpoint

    def stop():  # finish the optimizer step under way (all its micro-batches), then stop
        training.max_steps = min(training.max_steps, trainer.train_steps + 1)

    stopper = runs.StopRequest(on_stop=stop)
    trainer.with_training_hooks(runs.stop_hooks(stopper, config, stop_after, sft_metrics=metrics))
    with warnings.catch_warnings(action="ignore", category=DeprecationWarning), block["mesh"], stopper:
        trainer.train(block["batches"])  # on a resume Tunix fast-forwards past the micro-batches done
    metrics.finish()
    if trainer.train_steps >= config["max_steps"] and config["max_tokens_to_generate"]:
        import model as model_lib  # greedy samples: does the model now write <think>, <proof> and <answer>?
        outs = model_lib.generate(block["policy"], block["tokenizer"], [r["prompt"] for r in block["rows"][:4]],
                                  max_new_tokens=config["max_tokens_to_generate"], progress=False)
        ok = sum(all(f"<{t}>" in o["text"] and f"</{t}>" in o["text"] for t in ("think", "proof", "answer")) for o in outs)
        print(f"format adherence after SFT: {ok}/{len(outs)} greedy samples contain <think>, <proof> and <answer>")
        print(f"first sample: {outs[0]['text'][:600]!r}")
    return config["start_step"] - 1 + trainer.train_steps
