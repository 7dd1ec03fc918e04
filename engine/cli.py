"""`afdserve` command line: serve, generate, bench."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from afdserve.bench.serve import LENGTH_DISTS
from afdserve.engine.arg_utils import add_engine_args, engine_config_from_args
from afdserve.engine.config import CACHE_DEFAULTS, QUANTIZATIONS


def _generate(args: argparse.Namespace) -> int:
    from afdserve.engine.llm import LLM
    from afdserve.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed_request)
    with LLM(config=engine_config_from_args(args)) as llm:
        if args.chat:
            out = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
        else:
            out = llm.generate([args.prompt], params, use_tqdm=False)
    print(out[0].outputs[0].text)
    return 0


def _write_json(path: str | None, data: dict | list, device: str = "cpu") -> None:
    """Benchmarks print their result and, with --json, also write it for bench/results/, always with the host it
    ran on (bench/host.py): a list of rows is written as {"host": ..., "rows": [...]}."""
    if not path:
        return
    from afdserve.bench.host import host_info
    if isinstance(data, list):
        data = {"rows": data}
    data = {"host": data.get("host") or host_info(device), **data}
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def _bench_throughput(args: argparse.Namespace) -> int:
    from afdserve.bench.throughput import ThroughputSpec, format_result, run_throughput

    spec = ThroughputSpec(args.num_requests, args.input_len, args.output_len, args.concurrency, args.bench_seed)
    result = run_throughput(engine_config_from_args(args), spec)
    print(format_result(result))
    _write_json(args.json, result)
    return 0


def _bench_transport(args: argparse.Namespace) -> int:
    from afdserve.bench.transport import format_transport_result, run_transport_bench

    results = []
    for kind in args.transports:
        results.append(run_transport_bench(kind, args.steps, args.layers, args.tokens, args.hidden,
                                           args.transport_dtype, args.device))
        print(format_transport_result(results[-1]), flush=True)
    _write_json(args.json, results, args.device)
    return 0 if all(r.get("bytes_checked") or "skipped" in r for r in results) else 1


def _bench_serve(args: argparse.Namespace) -> int:
    from afdserve.bench.serve import format_serve_result, run_serve_bench

    spec = _workload(args, max_concurrency=args.max_concurrency, request_rate=args.request_rate,
                     burstiness=args.burstiness)
    result = run_serve_bench(spec)
    print(format_serve_result(result))
    _write_json(args.json, result)
    return 0 if result["failed"] == 0 else 1


def _bench_sweep(args: argparse.Namespace) -> int:
    from afdserve.bench.sweep import SweepSpec, format_sweep_result, parse_goodput, run_sweep

    try:
        spec = SweepSpec(_workload(args), tuple(args.concurrency or ()), tuple(args.request_rate or ()),
                         args.search, args.search_max, parse_goodput(args.goodput or []), args.slo_percentile)
    except ValueError as e:
        print(f"afdserve bench sweep: {e}", file=sys.stderr)
        return 2
    result = run_sweep(spec)
    print(format_sweep_result(result))
    _write_json(args.json, result)
    if args.plot:
        from afdserve.bench.plot import plot_sweeps
        print(f"wrote {plot_sweeps({args.base_url: result}, args.plot)}")
    return 0


def _bench_plot(args: argparse.Namespace) -> int:
    from afdserve.bench.plot import plot_sweeps

    sweeps = {}
    for item in args.sweeps:
        label, sep, path = item.rpartition("=")
        try:
            sweeps[label if sep else Path(path).stem] = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            print(f"afdserve bench plot: {path}: {e}", file=sys.stderr)
            return 2
    print(f"wrote {plot_sweeps(sweeps, args.out)}")
    return 0


def _bench_cost(args: argparse.Namespace) -> int:
    from afdserve.bench.cost import CostSpec, format_cost_result, run_cost

    try:
        prices = {}
        for item in args.price or []:
            name, sep, usd = item.partition("=")
            if not sep:
                raise ValueError(f"--price takes NAME=USD_PER_CARD_HOUR, got {item!r}")
            prices[name] = float(usd)
        result = run_cost(CostSpec(tuple(args.model), tuple(args.context), tuple(args.hardware), prices))
    except ValueError as e:
        print(f"afdserve bench cost: {e}", file=sys.stderr)
        return 2
    print(format_cost_result(result))
    _write_json(args.json, result)
    if args.plot:
        from afdserve.bench.cost import cost_against_context, plot_cost_against_context
        curves = cost_against_context(CostSpec(tuple(args.model), prices=prices), args.plot_card)
        print(f"wrote {plot_cost_against_context(curves, args.plot_card, args.plot)}")
    return 0


def _bench_plan(args: argparse.Namespace) -> int:
    from afdserve.bench import plan as planner

    if args.measured:
        if args.layers is None:
            raise ValueError("--measured needs --layers, the model's layer count (SmolLM2-135M: 30)")
        results = []
        for path in args.measured:
            with open(path) as f:
                results.append(json.load(f))
        profile = planner.fit_measured(results, args.layers)
        plans = planner.plan_measured(profile, args.layers, args.tpot_ms / 1e3, args.cores)
        for note in profile.notes:
            print(f"note: {note}")
        print(planner.format_plan(plans, f"this engine's workers ({args.cores} cores), fitted on "
                                         f"{profile.runs} run(s); TPOT <= {args.tpot_ms:g} ms; first = recommended",
                                  unit="core"))
        result = {"mode": "measured", "profile": dataclasses.asdict(profile),
                  "plans": [dataclasses.asdict(p) for p in plans]}
    else:
        efficiency = 1.0
        if args.calibrated:
            measured = planner.CALIBRATION[("MFA", 8192)]
            if args.hardware not in measured:
                raise ValueError(f"--calibrated: Step-3's Table 9 measures {', '.join(measured)}, not "
                                 f"{args.hardware}")
            efficiency = planner.kv_efficiency(args.hardware)
        opts = planner.Options(kv_efficiency=efficiency, realistic_net=args.realistic_net)
        plans = planner.plan(args.model, args.hardware, args.context, args.tpot_ms / 1e3, opts)
        print(planner.format_plan(plans, f"{args.model} on {args.hardware}, context {args.context}, "
                                         f"TPOT <= {args.tpot_ms:g} ms, KV efficiency {opts.kv_efficiency:.2f}"))
        result = {"mode": "analytic", "options": dataclasses.asdict(opts),
                  "plans": [dataclasses.asdict(p) for p in plans]}
        if args.model == "Step-3":
            check = planner.step3_2a2f(opts)
            best = check["best"]
            print(f"Step-3 2A2F (the paper: 4,039 tok/s/GPU at batch 6,144, TPOT {check['paper_tpot_s'] * 1e3:.1f} "
                  f"ms): predicted {best.tok_s_per_gpu:,.0f} tok/s/GPU at batch {best.batch:,}, TPOT "
                  f"{best.tpot_s * 1e3:.1f} ms, {best.bound}-bound: {check['ratio']:.2f}x the paper")
            result["step3_2a2f"] = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
                                    for k, v in check.items()}
    _write_json(args.json, result)
    return 0


def _bench_soak(args: argparse.Namespace) -> int:
    from afdserve.bench.soak import SoakSpec, format_soak_result, run_soak

    spec = SoakSpec(args.base_url, args.model, args.server_pid, args.minutes, args.concurrency,
                    kill_at_minute=args.kill_at_minute, seed=args.bench_seed)
    result = run_soak(spec)
    print(format_soak_result(result))
    _write_json(args.json, result)
    return 0 if result["lost"] == 0 and not result["kv_usage_after"] else 1


def _bench_kinetics(args: argparse.Namespace) -> int:
    from afdserve.bench import kinetics

    if args.traces:
        frontiers = {}
        for path in args.traces:
            rows = kinetics.load_trace_csv(path)
            for rule in sorted({r["config"].split()[0] for r in rows}):
                chosen = [r for r in rows if r["config"].split()[0] == rule]
                frontiers[f"{rule} ({os.path.basename(path)})"] = kinetics.frontier_from_traces(chosen, args.cost)
        for label, points in frontiers.items():
            print(f"{label}: " + ", ".join(f"{b:.3g} -> {s:.3f}" for b, s in points[::10] + points[-1:]))
        result = {"mode": "traces", "cost": args.cost, "frontiers": frontiers}
        if args.plot:
            xlabel = "measured eFLOPs per problem" if args.cost == "eflops" else "wall seconds per problem"
            print(f"wrote {kinetics.plot_frontiers(frontiers, args.plot, xlabel, 'Accuracy against cost')}")
    else:
        result = kinetics.run_analytic_sweep(kinetics.KineticsSpec(models=tuple(args.models), sign=args.sign))
        print(kinetics.format_kinetics_result(result))
        if args.plot:
            print(f"wrote {kinetics.plot_analytic(result, args.plot)}")
    _write_json(args.json, result)
    return 0


def _bench_tts(args: argparse.Namespace) -> int:
    from afdserve import LLM
    from afdserve.bench.tts import TTSSpec, format_tts_result, run_tts_sweep, write_trace_csv

    spec = TTSSpec(args.num_problems, tuple(args.trials), args.temperature, args.max_tokens, args.bench_seed)
    with LLM(config=engine_config_from_args(args)) as llm:
        result = run_tts_sweep(llm, spec)
    print(format_tts_result(result))
    if args.csv:
        print(f"wrote {write_trace_csv(result['rows'], args.csv)}")
    _write_json(args.json, {k: v for k, v in result.items() if k != "rows"})
    return 0


def _add_workload_args(parser: argparse.ArgumentParser, model_flag: str, count_flag: str, count: int) -> None:
    """The request flags `bench serve` and `bench sweep` share (bench/serve.ServeSpec)."""
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument(model_flag, dest="workload_model", default="smollm2",
                        help="the `model` field sent with each request")
    parser.add_argument(count_flag, dest="workload_count", type=int, default=count)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=49152, help="range of the random prompt token ids")
    parser.add_argument("--bench-seed", type=int, default=0)
    parser.add_argument("--length-dist", default="fixed", choices=LENGTH_DISTS,
                        help="per-request input and output lengths around --input-len / --output-len")
    parser.add_argument("--shared-prefix-len", type=int, default=0, help="tokens every prompt starts with")
    parser.add_argument("--turns", type=int, default=1, help="requests per chat conversation, each prompt the "
                                                             "conversation so far plus --input-len new tokens")


def _workload(args: argparse.Namespace, **load):
    from afdserve.bench.serve import ServeSpec
    return ServeSpec(base_url=args.base_url, model=args.workload_model, num_requests=args.workload_count,
                     input_len=args.input_len, output_len=args.output_len, vocab_size=args.vocab_size,
                     seed=args.bench_seed, length_dist=args.length_dist, shared_prefix_len=args.shared_prefix_len,
                     turns=args.turns, **load)


def _comma_list(kind):
    """argparse type for "1,4,16": a list of `kind`."""
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
    return parse


def _bench_moe(args: argparse.Namespace) -> int:
    from afdserve.bench.moe import MoEBenchSpec, format_moe_result, run_moe_bench

    spec = MoEBenchSpec(args.hidden, args.intermediate, args.experts, args.top_k, tuple(args.tokens),
                        tuple(args.dtypes), args.repeats)
    result = run_moe_bench(spec)
    print(format_moe_result(result))
    _write_json(args.json, result)
    return 0


def _bench_kernels(args: argparse.Namespace) -> int:
    from afdserve.bench.kernels import KernelBenchSpec, format_kernel_result, run_kernel_bench

    spec = KernelBenchSpec(kernels=tuple(args.kernels), batch=args.batch, context=args.context, chunk=args.chunk,
                           kv_heads=args.kv_heads, head_dim=args.head_dim, groups=tuple(args.groups),
                           block_size=args.block_size, dtype=args.kernel_dtype, kv_dtype=args.kv_dtype,
                           backends=tuple(args.backends), repeats=args.repeats, device=args.device)
    result = run_kernel_bench(spec, args.peak_gbps)
    print(format_kernel_result(result))
    _write_json(args.json, result)
    return 0


def _bench_kv_quant(args: argparse.Namespace) -> int:
    from afdserve.bench.kv_quant import KVQuantBenchSpec, format_kv_quant_result, run_kv_quant_bench

    # --kv-window / --kv-staircase are the int4 / saq rows' settings: the baseline's config must not carry them
    spec = KVQuantBenchSpec(tuple(args.kv_dtypes), args.num_tokens, args.chunk, args.kv_window, args.kv_staircase)
    args.kv_window, args.kv_staircase = CACHE_DEFAULTS["kv_window"], CACHE_DEFAULTS["kv_staircase"]
    config = engine_config_from_args(args)
    rows = run_kv_quant_bench(config, spec)
    print(format_kv_quant_result(rows, config, spec))
    _write_json(args.json, rows, config.model.device)
    return 0


def _bench_sparse(args: argparse.Namespace) -> int:
    from afdserve.bench.sparse import SparseBenchSpec, format_sparse_result, plot_sparse_result, run_sparse_bench

    policies = tuple(json.loads(p) if p.lstrip().startswith("{") else {"name": p} for p in args.policies)
    spec = SparseBenchSpec(policies, tuple(args.contexts), args.scored_tokens, tuple(args.depths), args.trials,
                           args.chunk, args.prefill_reps)
    config = engine_config_from_args(args)
    result = run_sparse_bench(config, spec)
    print(format_sparse_result(result))
    _write_json(args.json, result, config.model.device)
    if args.plot:
        plot_sparse_result(result, args.plot)
    return 0


def _readme_refactor(args: argparse.Namespace) -> int:
    from afdserve.bench.kv_quant import english_text
    from afdserve.engine.tokenizer import Tokenizer
    from afdserve.models.model_path import default_cache_dir, resolve_model_path
    from afdserve.models.readme_refactor import RefactorSpec, refactor_to_readme

    spec = RefactorSpec(num_experts=args.experts, shared_fraction=args.shared_fraction, top_k=args.top_k,
                        calibration_tokens=args.calibration_tokens, router_steps=args.router_steps)
    model_dir = resolve_model_path(args.model, args.cache_dir or default_cache_dir())
    text = Path(args.calibration_file).read_text() if args.calibration_file else english_text()
    out = refactor_to_readme(model_dir, Path(args.out), Tokenizer(model_dir).encode(text), spec)
    print(f"wrote {out}")
    return 0


def _bench_readme(args: argparse.Namespace) -> int:
    from afdserve.bench.readme import ReadMEBenchSpec, format_readme_result, run_readme_bench
    from afdserve.models.model_path import default_cache_dir, resolve_model_path
    from afdserve.models.readme_refactor import RefactorSpec

    refactor = RefactorSpec(num_experts=args.experts, shared_fraction=args.shared_fraction,
                            calibration_tokens=args.calibration_tokens, router_steps=args.router_steps)
    spec = ReadMEBenchSpec(refactor, tuple(args.top_ks), args.eval_tokens, args.dtype, args.cache_tokens,
                           tuple(args.concurrencies))
    result = run_readme_bench(resolve_model_path(args.model, args.cache_dir or default_cache_dir()), spec)
    print(format_readme_result(result))
    _write_json(args.json, result)
    return 0


def _bench_weight_quant(args: argparse.Namespace) -> int:
    from afdserve.bench.weight_quant import WeightQuantBenchSpec, format_weight_quant_result, run_weight_quant_bench

    config = engine_config_from_args(args)
    quantizations = tuple(None if q == "none" else q for q in args.quantizations)
    spec = WeightQuantBenchSpec(quantizations, args.num_tokens, args.chunk)
    rows = run_weight_quant_bench(config, spec)
    print(format_weight_quant_result(rows, config, spec))
    _write_json(args.json, rows, config.model.device)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from afdserve.engine.server.api_server import run_server
    return run_server(args)


def build_parser() -> argparse.ArgumentParser:
    from afdserve.engine.server.server_args import add_server_args

    parser = argparse.ArgumentParser(prog="afdserve", description="LLM serving with attention-FFN disaggregation")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (and gRPC)")
    add_engine_args(serve)
    add_server_args(serve)
    serve.set_defaults(func=_serve)

    gen = sub.add_parser("generate", help="complete one prompt and print the text")
    add_engine_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed-request", type=int, default=None, help="the request's sampling seed")
    gen.set_defaults(func=_generate)

    rr = sub.add_parser("readme-refactor", help="a dense Llama checkpoint into a Read-ME MoE (shared channels, "
                                                "experts, a token-id router); models/readme.py is the format")
    rr.add_argument("--model", required=True, help="the dense model: smollm2, a .gguf file or an HF directory")
    rr.add_argument("--experts", type=int, default=8, help="experts per layer")
    rr.add_argument("--shared-fraction", type=float, default=0.25, help="share of each MLP's channels always on")
    rr.add_argument("--top-k", type=int, default=None, help="experts per token in the written config (default: "
                    "every expert, the dense model; 1 or 2: Read-ME's sparse routing, far from dense without "
                    "fine-tuning)")
    rr.add_argument("--calibration-file", default=None,
                    help="calibration text (default: the standard library's pydoc_data.topics)")
    rr.add_argument("--calibration-tokens", type=int, default=2048)
    rr.add_argument("--router-steps", type=int, default=300,
                    help="training steps of the pre-gating router on the calibration tokens (0: untrained)")
    rr.add_argument("--out", required=True, help="the directory to write")
    rr.add_argument("--cache-dir", default=None, help="where imported GGUF models live (as for serve)")
    rr.set_defaults(func=_readme_refactor)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    tp = bench_sub.add_parser("throughput", help="offline throughput on synthetic requests")
    add_engine_args(tp)
    tp.add_argument("--num-requests", type=int, default=128)
    tp.add_argument("--input-len", type=int, default=128)
    tp.add_argument("--output-len", type=int, default=128)
    tp.add_argument("--concurrency", type=int, default=32, help="most requests in the engine at once")
    tp.add_argument("--bench-seed", type=int, default=0, help="seed of the synthetic prompts")
    tp.add_argument("--json", default=None, help="also write the result to this file")
    tp.set_defaults(func=_bench_throughput)
    tr = bench_sub.add_parser("transport", help="A<->F messages between two processes, byte-checked, then round "
                                                "trips timed, per transport")
    tr.add_argument("--transports", nargs="+", default=["gloo", "shm"], choices=["gloo", "shm", "nccl"],
                    help="nccl needs two GPUs")
    tr.add_argument("--device", default="cpu", help="where the messages live (cuda: gloo stages them via the host)")
    tr.add_argument("--steps", type=int, default=50)
    tr.add_argument("--layers", type=int, default=30)
    tr.add_argument("--tokens", type=int, default=32)
    tr.add_argument("--hidden", type=int, default=576)
    tr.add_argument("--transport-dtype", default="float32", choices=["float32", "bfloat16"])
    tr.add_argument("--json", default=None)
    tr.set_defaults(func=_bench_transport)
    sv = bench_sub.add_parser("serve", help="load an OpenAI-compatible server: Poisson arrivals, streaming")
    _add_workload_args(sv, "--served-model", "--num-requests", 128)
    sv.add_argument("--max-concurrency", type=int, default=32)
    sv.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s; inf sends all at once")
    sv.add_argument("--burstiness", type=float, default=1.0)
    sv.add_argument("--json", default=None)
    sv.set_defaults(func=_bench_serve)
    sw = bench_sub.add_parser("sweep", help="throughput and goodput against latency SLOs over loads, any "
                                            "OpenAI-compatible server (bench/sweep.py)")
    _add_workload_args(sw, "--model", "--num-prompts", 64)  # per load point
    loads = sw.add_mutually_exclusive_group(required=True)
    loads.add_argument("--concurrency", type=_comma_list(int), help="a grid, e.g. 1,4,16,32: requests in flight")
    loads.add_argument("--request-rate", type=_comma_list(float), help="a grid, e.g. 1,2,4: Poisson requests/s")
    loads.add_argument("--search", choices=["concurrency", "rate"],
                       help="bisect for the highest load meeting the SLO: concurrency from 1, rate from "
                            "--search-max / 64, up to --search-max")
    sw.add_argument("--search-max", type=float, default=64)
    sw.add_argument("--goodput", nargs="+", metavar="METRIC:MS", help="SLOs as vLLM's: ttft:MS tpot:MS e2el:MS")
    sw.add_argument("--slo-percentile", type=float, default=90.0, help="a load meets the SLO at this percentile")
    sw.add_argument("--json", default=None)
    sw.add_argument("--plot", default=None, metavar="FILE.png", help="throughput against TPOT, and the Pareto of "
                                                                     "tok/s per user against tok/s (matplotlib)")
    sw.set_defaults(func=_bench_sweep)
    pl = bench_sub.add_parser("plot", help="the plots of --plot over several `bench sweep --json` results")
    pl.add_argument("sweeps", nargs="+", metavar="[LABEL=]RESULT.json")
    pl.add_argument("--out", required=True, metavar="FILE.png")
    pl.set_defaults(func=_bench_plot)
    from afdserve.bench.cost import CATALOG, HARDWARE  # plain data, no torch
    cost = bench_sub.add_parser("cost", help="Step-3's theoretical decoding cost per model, context and card "
                                             "(bench/cost.py)")
    cost.add_argument("--model", nargs="+", default=list(CATALOG), metavar="NAME_OR_CONFIG",
                      help=f"catalog names ({', '.join(CATALOG)}) or paths to HF config.json files")
    cost.add_argument("--context", nargs="+", type=int, default=[8192, 32768])
    cost.add_argument("--hardware", nargs="+", default=list(HARDWARE), choices=list(HARDWARE))
    cost.add_argument("--price", nargs="+", metavar="NAME=USD", help="USD per card-hour; H100, H200 and B200 have none")
    cost.add_argument("--json", default=None)
    cost.add_argument("--plot", default=None, metavar="FILE.png", help="cost against context (1K-128K) per model")
    cost.add_argument("--plot-card", default="H800", choices=list(HARDWARE), help="the card of --plot")
    cost.set_defaults(func=_bench_cost)
    pn = bench_sub.add_parser("plan", help="AFD deployment planner: xAyF, micro-batches and batch under a TPOT SLA, "
                                           "from the cost model or this engine's measured --afd runs (bench/plan.py)")
    pn.add_argument("--model", default="Step-3", choices=list(CATALOG))
    pn.add_argument("--hardware", default="H800", choices=list(HARDWARE))
    pn.add_argument("--context", type=int, default=4096)
    pn.add_argument("--tpot-ms", type=float, default=50.0)
    pn.add_argument("--calibrated", action="store_true",
                    help="attention at the KV bandwidth efficiency of Step-3's Table 9 instead of the roofline")
    pn.add_argument("--realistic-net", action="store_true", help="DeepEP's 40 GB/s per 400 Gbps NIC")
    pn.add_argument("--measured", nargs="+", metavar="RESULT.json",
                    help="plan this engine's CPU workers from `bench throughput --afd xAyF --json` results")
    pn.add_argument("--layers", type=int, default=None, help="--measured: the model's layer count")
    pn.add_argument("--cores", type=int, default=os.cpu_count(), help="--measured: one worker per core")
    pn.add_argument("--json", default=None)
    pn.set_defaults(func=_bench_plan)
    kin = bench_sub.add_parser("kinetics", help="Kinetics eFLOPs frontiers: the analytic Qwen3 sweep, or measured "
                                                "traces (bench/kinetics.py)")
    kin.add_argument("--models", nargs="+", default=["Qwen3-0.6B", "Qwen3-1.7B", "Qwen3-4B", "Qwen3-8B",
                                                     "Qwen3-14B", "Qwen3-32B"])
    kin.add_argument("--sign", type=int, default=-1, choices=[-1, 1],
                     help="sign of the sparse cost's (B - L_in)^2 / 2 term (+1: Kinetics' oracle top-k code)")
    kin.add_argument("--traces", nargs="+", metavar="TRACES.csv",
                     help="frontiers of measured traces (problem,config,model,input_len,output_lens,correct"
                          "[,eflops][,wall_s]), one line per rule (the config's first word)")
    kin.add_argument("--cost", default="eflops", choices=["eflops", "wall_s"], help="--traces: the cost axis")
    kin.add_argument("--plot", default=None, metavar="FILE.png")
    kin.add_argument("--json", default=None)
    kin.set_defaults(func=_bench_kinetics)
    sk = bench_sub.add_parser("soak", help="minutes of mixed streaming load on a running server, with hang-ups and "
                                           "an AFD worker kill: lost requests, leaked KV, RSS and p99 per minute")
    sk.add_argument("--base-url", default="http://127.0.0.1:8000")
    sk.add_argument("--model", default="smollm2", help="the served model name")
    sk.add_argument("--server-pid", type=int, default=None, help="for RSS and the worker kill")
    sk.add_argument("--minutes", type=float, default=20.0)
    sk.add_argument("--concurrency", type=int, default=8)
    sk.add_argument("--kill-at-minute", type=float, default=10.0, help="SIGKILL one ray::FFNWorker then")
    sk.add_argument("--bench-seed", type=int, default=0)
    sk.add_argument("--json", default=None)
    sk.set_defaults(func=_bench_soak)
    tts = bench_sub.add_parser("tts", help="measured test-time scaling: Best-of-N and majority vote on few-shot "
                                           "addition, accuracy against the engine's eFLOPs and wall time")
    add_engine_args(tts)
    tts.add_argument("--num-problems", type=int, default=40)
    tts.add_argument("--trials", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="the N's")
    tts.add_argument("--temperature", type=float, default=0.8)
    tts.add_argument("--max-tokens", type=int, default=5)
    tts.add_argument("--bench-seed", type=int, default=0)
    tts.add_argument("--csv", default=None, help="the traces, for `bench kinetics --traces`")
    tts.add_argument("--json", default=None)
    tts.set_defaults(func=_bench_tts)
    moe = bench_sub.add_parser("moe", help="MoE layer (router + experts) tokens/s against tokens, CPU torch path")
    moe.add_argument("--hidden", type=int, default=512, help="default: Mixtral-8x7B scaled 8x down (bench/moe.py)")
    moe.add_argument("--intermediate", type=int, default=1792, help="one expert's SwiGLU width")
    moe.add_argument("--experts", type=int, default=8)
    moe.add_argument("--top-k", type=int, default=2)
    moe.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 128, 512, 2048])
    moe.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    moe.add_argument("--repeats", type=int, default=5)
    moe.add_argument("--json", default=None)
    moe.set_defaults(func=_bench_moe)
    kn = bench_sub.add_parser("kernels", help="paged attention kernels: GB/s and %% of peak HBM (Triton on CUDA only)")
    kn.add_argument("--kernels", nargs="+", default=["decode", "prefill"], choices=["decode", "prefill"])
    kn.add_argument("--batch", type=int, default=8)
    kn.add_argument("--context", type=int, default=1024, help="cached tokens per sequence (queries included)")
    kn.add_argument("--chunk", type=int, default=128, help="prefill: new tokens per sequence")
    kn.add_argument("--kv-heads", type=int, default=8)
    kn.add_argument("--head-dim", type=int, default=128)
    kn.add_argument("--groups", type=int, nargs="+", default=[4, 8], help="query heads per KV head (GQA ratios)")
    kn.add_argument("--block-size", type=int, default=16)
    kn.add_argument("--kernel-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    kn.add_argument("--kv-dtype", default="auto", choices=["auto", "int8", "fp8_e4m3"],
                    help="KV cache elements: the kernel dtype, or codes + per-token scales")
    kn.add_argument("--backends", nargs="+", default=["torch", "triton"], choices=["torch", "triton"],
                    help="triton runs on CUDA only")
    kn.add_argument("--repeats", type=int, default=5, help="CPU timing repeats (CUDA uses do_bench)")
    kn.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    kn.add_argument("--peak-gbps", type=float, default=None, help="peak HBM GB/s; default: looked up by device name")
    kn.add_argument("--json", default=None)
    kn.set_defaults(func=_bench_kernels)
    kvq = bench_sub.add_parser("kv-quant", help="perplexity and KV bytes per token for each --kv-cache-dtype")
    add_engine_args(kvq)
    kvq.add_argument("--kv-dtypes", nargs="+", default=["auto", "fp8_e4m3", "int8", "int4", "saq"],
                     help="the first is the baseline of the delta column")
    kvq.add_argument("--num-tokens", type=int, default=2048, help="tokens of pydoc_data.topics to score")
    kvq.add_argument("--chunk", type=int, default=256, help="prefill chunk (max_num_batched_tokens)")
    kvq.add_argument("--json", default=None)
    kvq.set_defaults(func=_bench_kv_quant)
    sp = bench_sub.add_parser("sparse", help="attention policies on long text: decode perplexity, passkey "
                                             "retrieval, attended fraction, decode and prefill time per context")
    add_engine_args(sp)
    sp.add_argument("--policies", nargs="+", default=["dense", "quest", "delta", "prflash"],
                    help="policy names, or JSON objects with parameters ('{\"name\": \"delta\", \"budget_pages\": "
                         "32}'); dense is added first if missing")
    sp.add_argument("--contexts", nargs="+", type=int, default=[2048, 4096, 8192])
    sp.add_argument("--scored-tokens", type=int, default=128, help="teacher-forced decodes scored per context")
    sp.add_argument("--depths", nargs="+", type=float, default=[0.1, 0.5, 0.9], help="where the pass key sits")
    sp.add_argument("--trials", type=int, default=20, help="passkey trials per depth")
    sp.add_argument("--chunk", type=int, default=512, help="prefill chunk of the perplexity text")
    sp.add_argument("--prefill-reps", type=int, default=3,
                    help="one-chunk prefills timed per context for dense and each policy with its own prefill")
    sp.add_argument("--json", default=None)
    sp.add_argument("--plot", default=None, help="passkey accuracy against attended fraction (needs matplotlib)")
    sp.set_defaults(func=_bench_sparse)
    rb = bench_sub.add_parser("readme", help="Read-ME refactoring: perplexity of the dense model against the "
                                             "refactored one, every expert or top-k, router untrained or trained; "
                                             "expert-cache hit rates, Belady against LRU")
    rb.add_argument("--model", default="smollm2", help="the dense model: smollm2, a .gguf file or an HF directory")
    rb.add_argument("--experts", type=int, default=8)
    rb.add_argument("--shared-fraction", type=float, default=0.25)
    rb.add_argument("--top-ks", nargs="+", type=int, default=[1, 2])
    rb.add_argument("--calibration-tokens", type=int, default=2048)
    rb.add_argument("--router-steps", type=int, default=300)
    rb.add_argument("--eval-tokens", type=int, default=1024)
    rb.add_argument("--dtype", default="float32")
    rb.add_argument("--cache-tokens", type=int, default=4096, help="tokens of the expert-cache trace")
    rb.add_argument("--concurrencies", nargs="+", type=int, default=[1, 32], help="streams read at once")
    rb.add_argument("--json", default=None)
    rb.add_argument("--cache-dir", default=None, help="where imported GGUF models live (as for serve)")
    rb.set_defaults(func=_bench_readme)
    wq = bench_sub.add_parser("weight-quant", help="perplexity and weight bytes for each --quantization")
    add_engine_args(wq)
    wq.add_argument("--quantizations", nargs="+", default=["none", "int8"], choices=["none", *QUANTIZATIONS],
                    help="the first is the baseline of the delta column")
    wq.add_argument("--num-tokens", type=int, default=2048, help="tokens of pydoc_data.topics to score")
    wq.add_argument("--chunk", type=int, default=256, help="prefill chunk (max_num_batched_tokens)")
    wq.add_argument("--json", default=None)
    wq.set_defaults(func=_bench_weight_quant)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"afdserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
