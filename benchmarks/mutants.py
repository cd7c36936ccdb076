#!/usr/bin/env python3
"""Mutation testing with curated mutants: would the test suite notice if the GAN's maths, data, checkpoints
or outputs broke? Each mutant is one small, behaviour-changing edit of gan_mnist.py, the kind a careless
refactor makes. For each, a copy of the project gets the edit and runs the default test suite with -x
(the fast maths and contract tests first); a failing suite kills the mutant. Prints one JSON line: the kill
rate, the survivors, the time. mutmut 3 and cosmic-ray were the alternatives: on a 2-core machine with a
suite of about a minute they need hours for the hundreds of trivial mutants they generate, where these
dozens target what a user gets.

    python benchmarks/mutants.py                  # all mutants, about 20-30 minutes on 2 cores
    python benchmarks/mutants.py --only fid,png   # those whose name contains one of these
    python benchmarks/mutants.py --list
    MUTANTS_DEBUG=1 python benchmarks/mutants.py --only NAME   # also the end of each test run's output

A mutant marked `equivalent` changes no behaviour a user can observe (its reason is given); it is run and
reported, but not counted in the kill rate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST_ORDER = [
    "tests/test_maths.py",
    "tests/test_variants.py",
    "tests/test_round3.py",
    "tests/test_contracts.py",
    "tests/test_trainer.py",
    "tests/test_evaluate.py",
    "tests/test_conditional.py",
    "tests/test_faults.py",
]

# (name, old text, new text[, reason it is equivalent]); `old` must occur exactly once in gan_mnist.py. Old and new
# may be tuples of alternatives (the first that occurs exactly once is used), to measure an older suite too.
MUTANTS: list[tuple[str, ...]] = [
    # -- the variants: DCGAN and WGAN-GP (the GP's two bugs the reference implementations carry come first)
    ("gp-alpha-per-pixel", "alpha = torch.rand(batch, 1, 1, 1, device=real.device)", "alpha = torch.rand_like(real)"),
    ("gp-norm-over-channels", "(grad.float().flatten(1).norm(dim=1) - 1)", "(grad.float().norm(dim=1) - 1)"),
    ("gp-weight-ignored", "d_total + nets.gp_weight * (grad", "d_total + 1.0 * (grad"),
    ("critic-loss-sign", "return fake.mean() - real.mean()", "return real.mean() - fake.mean()"),
    ("g-trains-every-batch", "done % cfg.n_critic == 0", "True"),
    ("ema-moves-on-critic-steps", "        if update_g:\n            nets.update_ema()", "        nets.update_ema()"),
    (
        "ema-batch-norm-copied-from-g",
        "fit_batch_norm(self.ema)\n",
        "[b.copy_(a) for a, b in zip(self.G.buffers(), self.ema.buffers())]\n",
    ),  # fmt: skip
    (
        "ema-batch-norm-never-fit",
        "if self.ema is not None and self.ema_fitted_at != int(self.ema_updates):",
        "if False:",
    ),  # fmt: skip
    ("ema-batch-norm-fit-once", "self.ema_fitted_at != int(self.ema_updates):", "self.ema_fitted_at < 0:"),
    ("ema-batch-norm-fit-draws-training-rng", "rng = torch.Generator(device).manual_seed(0)", "rng = None"),
    ("ema-batch-norm-fit-not-reset", "        m.reset_running_stats()\n", ""),
    ("ema-batch-norm-fit-with-momentum", "        m.momentum = None  # a cumulative", "        pass  # a cumulative"),
    (
        "ema-batch-norm-fit-in-eval-mode",
        "    G.train()\n    for i in range(batches",
        "    G.eval()\n    for i in range(batches",
    ),
    ("ema-batch-norm-momentum-not-restored", "        m.momentum = momentum\n", ""),
    ("checkpoint-ema-statistics-unfit", "nets.sampler().state_dict(),", "nets.ema.state_dict(),"),
    ("generator-file-forgets-arch", '"arch": G.arch,', '"arch": "mlp",'),
    ("checkpoint-rebuild-ignores-arch", 'arch, clusters = config.get("arch", "mlp"),', 'arch, clusters = "mlp",'),
    ("batch-norm-eps-for-momentum", "nn.BatchNorm2d(c), nn.ReLU(True)", "nn.BatchNorm2d(c, 0.8), nn.ReLU(True)"),
    (
        "dcgan-generator-hidden-layer-without-norm-and-relu",
        "first = [nn.Linear(in_dim, 256, bias=False), nn.BatchNorm1d(256), nn.ReLU(True)] if hidden else []",
        "first = [nn.Linear(in_dim, 256, bias=False)] if hidden else []",
    ),
    ("conditional-dcgan-generator-with-hidden-layer", "hidden=not labels)", "hidden=True)"),
    (
        "stdout-full-stops-training",
        '        sys.stdout = open(os.devnull, "w")  # noqa: SIM115',
        "        raise  # noqa: SIM115",
    ),
    (
        "stdout-full-command-traceback",
        'raise GanError(f"cannot write to standard output: {exc.strerror or exc}") from None',
        "raise",
    ),
    (
        "evaluate-stdout-failure-loses-the-file",
        "    finally:\n        write_json(out, metrics)",
        "    finally:\n        pass",
    ),
    (
        "batch-of-one-digit-kept",
        "return batches[:-1] if batch_size > 1 and len(batches[-1]) == 1 else batches",
        "return batches",
    ),
    ("dcgan-batch-size-one-accepted", 'cfg.arch != "dcgan" or cfg.batch_size > 1', "True"),
    ("broken-pipe-traceback", "except BrokenPipeError:  # stdout closed early", "except ZeroDivisionError:  # stdout"),
    (
        "training-broken-pipe-loses-the-epoch",
        "        StopSignal.active.signum = StopSignal.active.signum or signal.SIGPIPE\n",
        "        raise\n",
    ),
    (
        "dcgan-critic-without-hidden-layer",
        "nn.Flatten(), *_mlp([2 * c * 49, 256], True)), 256",
        "nn.Flatten()), 2 * c * 49",
    ),
    (
        "batch-norm-in-the-critic",
        "nn.Conv2d(c, 2 * c, 4, 2, 1),",
        "nn.Conv2d(c, 2 * c, 4, 2, 1), nn.BatchNorm2d(2 * c),",
    ),
    ("wgan-gp-preset-one-critic-step", '"n_critic": 5', '"n_critic": 1'),
    ("critic-scores-named-probabilities", '("critic_real", "critic_fake")', '("d_x", "d_g_z")'),
    (
        "loss-not-run-defining",
        'presets its recipe)",\n                   defining=True)',
        'presets its recipe)",\n                   defining=False)',
    ),
    (
        "clusters-not-run-defining",
        'metavar="N",\n                       defining=True)',
        'metavar="N",\n                       defining=False)',
    ),
    ("spectral-norm-skips-convolutions", "isinstance(m, (nn.Linear, nn.Conv2d))", "isinstance(m, nn.Linear)"),
    ("critic-statistics-as-probabilities", 'lambda s: s, ("critic_real"', 'torch.sigmoid, ("critic_real"'),
    # -- metrics
    (
        "fid-ignores-covariance",
        "return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(covmean)))",
        "return float(((mu1 - mu2) ** 2).sum())",
    ),
    ("fid-sign-of-cross-term", "np.trace(s2) - 2 * np.trace(", "np.trace(s2) + 2 * np.trace("),
    (
        "is-without-marginal",
        "(probs * (np.log(probs + eps) - np.log(p_y + eps))).sum(1)",
        "(probs * np.log(probs + eps)).sum(1)",
    ),
    ("modes-threshold", "(hist >= 0.02).sum()", "(hist >= 0.2).sum()"),
    ("kl-to-uniform", "np.log(hist[nonzero] * NUM_CLASSES)", "np.log(hist[nonzero])"),
    (
        "precision-recall-swapped",
        "return inside_real.double().mean().item(), inside_fake.double().mean().item()",
        "return inside_fake.double().mean().item(), inside_real.double().mean().item()",
    ),
    ("knn-counts-itself", "nearest(x, x, k + 1)[0][:, k]", "nearest(x, x, k)[0][:, k - 1]"),
    ("distances-without-query-norm", "yield d.add_(q.square().sum(1, keepdim=True))", "yield d.add_(0)"),
    (
        "judge-chunks-overwrite-each-other",
        "        feats[start : start + len(h)] = h\n",
        "        feats[: len(h)] = h\n",
    ),
    (
        "eval-shifts-training-rng",
        "            with torch.random.fork_rng(devices=[]):  # its throwaway init",
        "            with contextlib.nullcontext():  # its throwaway init",
    ),
    # -- data and outputs
    ("data-in-0-1", ".float().div_(127.5).sub_(1.0)", ".float().div_(255.0)"),
    (
        "uint8-without-shift",
        "((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5)",
        "(images.detach().float().cpu().clamp(0, 1) * 255)",
    ),
    ("grid-without-range-mapping", "normalize=True, value_range=(-1, 1), padding=2 * scale", "padding=2 * scale"),
    ("grid-rounds-down", "grid.mul(255).add_(0.5)", "grid.mul(255)"),
    ("epoch-order-not-shuffled", "torch.randperm(num_images, generator=generator)", "torch.arange(num_images)"),
    ("fixed-noise-unseeded", "gen = torch.Generator().manual_seed(cfg.seed)  # its own", "gen = torch.Generator()  #"),
    # -- conditioning
    ("g-ignores-label", "self.label_embedding(labels))", "self.label_embedding(torch.zeros_like(labels)))"),
    (
        "d-projection-ignores-label",
        "logits = logits + (self.label_projection(labels) * h).sum(dim=1)",
        "logits = logits + (self.label_projection(torch.zeros_like(labels)) * h).sum(dim=1)",
    ),
    ("generate-wrong-digit", "torch.full((args.num,), int(digit))", "torch.full((args.num,), 9 - int(digit))"),
    ("conditional-default-keeps-r1", '"arch": "mlp"}, {"r1_gamma": 0.0}', '"arch": "mlp"}, {}'),
    ("conditional-dcgan-drops-r1", '({"conditional": True, "arch": "mlp"}', '({"conditional": True}'),
    ("dcgan-default-gamma", '    ({"arch": "dcgan", "conditional": False, "clusters": 0}, {"r1_gamma": 8.0}),\n', ""),
    (
        "conditional-dcgan-takes-dcgan-gamma",
        '{"arch": "dcgan", "conditional": False, "clusters": 0}',
        '{"arch": "dcgan", "clusters": 0}',
    ),
    (
        "clustered-dcgan-takes-dcgan-gamma",
        '{"arch": "dcgan", "conditional": False, "clusters": 0}',
        '{"arch": "dcgan", "conditional": False}',
    ),
    (  # the gradient penalty's entry must come after the DCGAN's, to replace its R1
        "dcgan-gamma-after-wgan-gp",
        '    ({"arch": "dcgan", "conditional": False, "clusters": 0}, {"r1_gamma": 8.0}),\n    ({"loss": "wgan-gp"}, '
        '{"lr": 1e-4, "b2": 0.9, "n_critic": 5, "gp_weight": 10.0, "r1_gamma": 0.0}),\n',
        '    ({"loss": "wgan-gp"}, {"lr": 1e-4, "b2": 0.9, "n_critic": 5, "gp_weight": 10.0, "r1_gamma": 0.0}),\n'
        '    ({"arch": "dcgan", "conditional": False, "clusters": 0}, {"r1_gamma": 8.0}),\n',
    ),
    ("tutorial-recipe-keeps-r1", '({"recipe": "tutorial"}, {"r1_gamma": 0.0})', '({"recipe": "tutorial"}, {})'),
    # -- the GAN step
    (
        "d-targets-swapped",
        "torch.cat([torch.ones(batch), torch.zeros(batch)])",
        "torch.cat([torch.zeros(batch), torch.ones(batch)])",
    ),
    ("g-target-zero", "fake_logits.device)[: len(fake_logits)]", "fake_logits.device)[len(fake_logits) :]"),
    ("g-never-steps", "    nets.opt_g.step()\n", "    pass\n"),
    ("d-never-steps", "    nets.opt_d.step()\n", "    pass\n"),
    ("ema-never-updates", "torch._foreach_lerp_(ema, list(self.G.parameters()), [1 - decay] * len(ema))", "pass"),
    ("ema-blend-inverted", "[1 - decay] * len(ema))", "[decay] * len(ema))"),
    ("ema-weight-read-back-to-the-host", "[1 - decay] * len(ema))", "1 - decay)"),
    ("r1-on-fakes", "grad[:batch].float().square()", "grad[batch:].float().square()"),
    ("r1-not-lazy-scaled", "cfg.r1_gamma / 2 * cfg.r1_every, cfg.gp_weight", "cfg.r1_gamma / 2, cfg.gp_weight"),
    ("r1-off-schedule", "% cfg.r1_every == 0", "% cfg.r1_every == 1"),
    ("lr-decay-off-by-one", "decay = 1.0 - (epoch - 1) / cfg.epochs", "decay = 1.0 - epoch / cfg.epochs"),
    ("capturable-lr-left-on-the-cpu", 'Tensor) and group["lr"].device == group["params"][0].device:', "Tensor):"),
    (
        "g-weights-row-major",
        "G, D = (net.to(device, memory_format=torch.channels_last) for net in (G, D))",
        "G, D = G.to(device), D.to(device, memory_format=torch.channels_last)",
    ),
    (
        "d-weights-row-major",
        "G, D = (net.to(device, memory_format=torch.channels_last) for net in (G, D))",
        "G, D = G.to(device, memory_format=torch.channels_last), D.to(device)",
    ),
    (
        "resumed-moments-keep-their-saved-layout",
        "s.update({k: torch.empty_like(p).copy_(v) for k, v in s.items() if v.shape == p.shape})",
        "pass",
    ),
    # -- --clusters: the self-conditioned DCGAN
    ("dcgan-preset-without-clusters", '"conditional": False}, {"clusters": 40}),', '"conditional": False}, {}),'),
    (  # a preset choice must count for the entries after it: else the clustered DCGAN gets the plain one's R1
        "presets-ignore-earlier-presets",
        "chosen |= {k: v for k, v in settings.items() if k in chosen and k not in flags}",
        "pass",
    ),
    ("clusters-by-pixel-kmeans", "return kmeans(torch.from_numpy(vectors", "return kmeans(x, k)  # ("),
    (
        "clusters-drawn-equally",
        "k = torch.searchsorted(cdf, u.contiguous(), right=True)",
        "k = (u * self.clusters).long()",
    ),
    (
        "cluster-noise-not-spread-back",
        "return torch.cat([math.sqrt(2) * torch.erfinv(2 * v[:, None] - 1).to(z.dtype), z[:, 1:]], dim=1), k",
        "return z, k",
    ),
    ("cluster-shares-not-given-to-g", "        G.cluster_cdf.copy_(cdf)\n", "        pass\n"),
    ("resume-finds-clusters-again", "    if state.cluster_ids is None:\n        say(", "    if True:\n        say("),
    ("cluster-ids-unchecked", "if len(ids) != len(images) or int(ids.max()) >= k:", "if False:"),
    (
        "clusters-not-fed-to-the-step",
        "run.labels[idx] if cfg.labelled else None",
        "run.labels[idx] if cfg.conditional else None",
    ),
    (
        "autocast-cache-off",
        "cache_enabled=on_cpu)",
        "cache_enabled=False)",
        "the weight cache changes the step's speed (README, Speed), not its values: a cached cast equals a fresh one",
    ),
    ("ttur-ignored", "(nets.opt_d, cfg.d_lr or cfg.lr)", "(nets.opt_d, cfg.lr)"),
    (
        "ttur-initial-lr-only",
        "make_adam(D.parameters(), cfg, cfg.d_lr or cfg.lr, capturable)",
        "make_adam(D.parameters(), cfg, cfg.lr, capturable)",
        "set_schedule sets both learning rates before the first step of every epoch: the initial value is never used",
    ),
    (
        "fake-not-detached-for-d",
        "d_in = torch.cat([real, fake.detach()]).requires_grad_(r1)",
        "d_in = torch.cat([real, fake]).requires_grad_(r1)",
    ),
    # -- checkpoints, resume, best model, tidy-up
    ("batch-size-not-run-defining", '_f(64, "images per training step", defining=True)', '_f(64, "images per step")'),
    ("rng-not-restored", '    torch.set_rng_state(state.rng["torch"])\n', "    pass\n"),
    (
        "next-epoch-order-not-saved",
        'state.rng["data"], state.epoch_stats = run.data_rng.get_state(), torch.zeros(4)',
        'state.rng["data"], state.epoch_stats = state.rng["data"], torch.zeros(4)',
    ),
    ("stale-grids-kept", "                png.unlink()\n", "                pass\n"),
    (
        "best-keeps-highest-fid",
        'if state.best is None or metrics["fid"] < state.best["fid"]:',
        'if state.best is None or metrics["fid"] > state.best["fid"]:',
    ),
    (
        "best-not-carried-by-resume",
        "checkpoint[f.name] for f in dataclasses.fields(RunState)})",
        'checkpoint[f.name] for f in dataclasses.fields(RunState) if f.name != "best"})',
    ),
    ("keeps-one-checkpoint-too-many", '"epoch_", ".pt")[:-keep] if keep', '"epoch_", ".pt")[: -keep - 1] if keep'),
    # -- round 3: never another run's folder, never the user's files
    ("run-id-unread-from-config", "if state.run_id and other and other != state.run_id:", "if False:"),
    ("run-id-unread-from-last", 'if state.run_id and latest.run_id not in ("", state.run_id):', "if False:"),
    (
        "trained-past-guard-inverted",
        "(latest.epoch, latest.step) > (state.epoch, state.step)",
        "(latest.epoch, latest.step) < (state.epoch, state.step)",
    ),
    ("branch-keeps-the-run-id", '        checkpoint["run_id"] = os.urandom(8).hex()\n', "\n"),
    (
        "mid-epoch-resume-with-fewer-epochs",
        "    if state.epoch >= merged.epochs and not evaluation_pending",
        "    if state.step == 0 and state.epoch >= merged.epochs and not evaluation_pending",
    ),
    ("failed-start-litter", "for name in os.listdir(run_dir) if before is not None else []:", "for name in []:"),
    ("failed-start-removes-users-files", "if name not in before and name in (*RUN_OUTPUTS, LOCK):", "if True:"),
    ("lock-writes-over-users-lock", 'LOCK = ".gan_mnist.lock"', 'LOCK = ".lock"'),
    ("outputs-may-be-inputs", "if where in {Path(p).resolve() for p in inputs if p} or named", "if named"),
    ("outputs-may-be-a-runs-files", "or named and run_part(where):", "or False:"),
    ("evaluate-default-out-refused-in-checkpoints", "named=bool(args.out) or path is not out)", "named=True)"),
    ("outputs-may-be-inside-a-runs-folders", "for p in (path, *path.parents)", "for p in (path,)"),
    (
        "generate-output-unchecked",
        "sqrt(args.num)))\n    check_output(out, [args.checkpoint], file=not args.to_folder)",
        "sqrt(args.num)))",
    ),
    ("interpolate-output-unchecked", "    check_output(out, [args.checkpoint])\n    G, _, device", "    G, _, device"),
    (
        "evaluate-output-unchecked",
        "check_output(path, (args.checkpoint, args.judge, args.data_dir), named=",
        "(lambda *a, **k: None)(path, named=",
    ),
    ("write-error-claims-a-previous-file", 'if existed else "nothing was written"', 'if True else ""'),
    ("device-called-a-folder", 'if path.is_dir() else "is not a regular file (a device or a pipe?)"', ""),
    ("run-inside-another-runs-folder", "if part := run_part(folder.resolve()):", "if False:"),
    ("run-folder-known-only-by-checkpoint", 'return isinstance(config, dict) and "run_id" in config', "return False"),
    ("output-folder-accepted", "if file and path.is_dir():", "if False:"),
    (
        "generate-folder-called-a-file",
        "check_output(out, [args.checkpoint], file=not args.to_folder)",
        "check_output(out, [args.checkpoint])",
    ),  # fmt: skip
    ("default-outputs-inside-a-run", 'if part := run_part(Path("outputs").resolve()):', "if False:"),
    (
        "run-dir-links-followed-late",
        "if part := run_part(folder.resolve()):",
        "if part := run_part(Path(os.path.abspath(folder))):",
    ),
    ("resume-hint-of-a-refused-run-unquoted", "--resume {shlex.quote(str(last))}, or", "--resume {last}, or"),
    ("judge-among-a-runs-files", "if run_part(path.resolve()):  # a run's samples/", "if False:  # a run's samples/"),
    ("latent-dim-unbounded", '(1 <= cfg.latent_dim <= MAX_LATENT, f"--latent-dim must be 1 to {MAX_LATENT}"),', ""),
    (
        "out-of-memory-traceback",
        "if isinstance(exc, RuntimeError) and not out_of_memory(exc):",
        "if isinstance(exc, RuntimeError):",
    ),
    ("bugs-disguised-as-out-of-memory", "if isinstance(exc, RuntimeError) and not out_of_memory(exc):", "if False:"),
    (
        "out-of-memory-unnamed",
        (
            'if not isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)) and "can\'t allocate memory" not in '
            "str(exc):"
        ),  # fmt: skip
        "if True:",
    ),
    ("generate-folder-overwrites", "if args.to_folder and out.is_dir() and any(out.iterdir()):", "if False:"),
    ("links-followed", "        if folder.is_symlink():  # pruning there", "        if False:  # pruning there"),
    (
        "temporaries-match-loosened",
        r're.fullmatch(r"\.(.+)\.tmp\d+", tmp.name)',
        r're.match(r"\.(.+)\.tmp\d+", tmp.name)',
    ),
    # -- round 3: one line for every failure, bounded work
    ("floor-cache-unchecked", 'and not type_problem(cached["floor"], numbers)', "and True"),
    ("generator-schema-without-ema", '{"epoch": "int", "ema": "bool", "latent_dim"', '{"epoch": "int", "latent_dim"'),
    (
        "rng-part-unchecked",
        '"rng": {"torch": "Tensor", "cuda": "Tensor | None", "data": "Tensor"},',
        '"rng": {"torch": "Tensor", "data": "Tensor"},',
    ),
    (
        "pixels-of-a-picture-unbounded",
        'kind != ".png" or args.num * (30 * args.scale) ** 2 <= MAX_PIXELS,',
        "True,",
    ),
    ("pixels-of-a-gif-unbounded", "if args.frames * args.paths * (30 * args.scale) ** 2 > MAX_PIXELS:", "if False:"),
    ("empty-out-is-the-current-folder", "or bool(args.out) and Path(args.out).is_dir()", "or Path(args.out).is_dir()"),
    (
        "resume-hint-unquoted",
        'return " ".join(shlex.quote(str(w)) for w in words)',
        'return " ".join(str(w) for w in words)',
    ),
    # -- round 3: signals
    (
        "nohup-overridden",
        "                if signal.getsignal(sig) is not signal.SIG_IGN:\n                    self._old",
        "                if True:\n                    self._old",
    ),
    ("long-phases-ignore-the-stop", "if StopSignal.active is not None and StopSignal.active.signum:", "if False:"),
    ("cut-evaluation-never-redone", "return done and not any(", "return False and not any("),
    ("sigterm-kills-commands-mid-write", "        raise Interrupted(signum)\n", "        pass\n"),
    # -- issue 20: the last round's features, pinned
    (
        "evaluation-epochs-shifted",
        "cfg.eval_every > 0 and epoch % cfg.eval_every == 0",
        "cfg.eval_every > 0 and (epoch + 1) % cfg.eval_every == 0",
    ),
    (
        "judge-training-shifts-the-run",
        "    with torch.random.fork_rng(devices=[]):  # the judge's seed",
        "    with contextlib.nullcontext():  # the judge's seed",
    ),
    ("near-copy-quantile", "torch.quantile(test_d, 0.01)", "torch.quantile(test_d, 0.05)"),
    ("summary-config-unescaped", "<td>{esc(str(v))}</td>", "<td>{v}</td>"),
    ("summary-commands-unescaped", 'commands=esc("\\n".join(', 'commands=("\\n".join('),
    ("floor-on-all-training-digits", "self.train_images[: self.num].cpu()", "self.train_images.cpu()"),
    (
        "evaluation-leaves-g-in-eval-mode",
        "        finally:\n            G.train(was_training)",
        "        finally:\n            pass",
    ),
    (
        "evaluate-loses-the-labels",
        "**evaluator.score(images, labels, memorise=True)",
        "**evaluator.score(images, None, memorise=True)",
    ),
    (
        "all-digits-row-width",
        "save_png(out, grid_image(draw(0, num), nrow, args.scale))",
        "save_png(out, grid_image(draw(0, num), max(1, int(math.sqrt(num))), args.scale))",
    ),
    ("ema-decay-uncapped", ").clamp(max=self.ema_decay)", ")"),
]


def run_mutant(project: Path, old: str | tuple, new: str | tuple, source: str, timeout: int) -> tuple[str, float]:
    pairs = list(zip(old, new)) if isinstance(old, tuple) else [(old, new)]
    found = [(o, n) for o, n in pairs if source.count(o) == 1]
    if not found:
        return "stale: the text to mutate is not in gan_mnist.py exactly once", 0.0
    old, new = found[0]
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "project"
        ignore = shutil.ignore_patterns("outputs", ".git", "__pycache__", ".*_cache", "data")
        shutil.copytree(project, copy, ignore=ignore)
        shutil.copytree(project / "tests" / "data", copy / "tests" / "data", dirs_exist_ok=True)
        (copy / "gan_mnist.py").write_text(source.replace(old, new))
        tests = [t for t in TEST_ORDER if (copy / t).is_file()]
        tests += sorted(
            str(t.relative_to(copy))
            for t in (copy / "tests").glob("test_*.py")
            if str(t.relative_to(copy)) not in tests
        )
        started = time.perf_counter()
        try:
            result = subprocess.run(
                # Its own temporary folder: pytest sessions sharing one prune each other's folders.
                [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp}/pt", *tests],
                cwd=copy,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            outcome = "survived" if result.returncode == 0 else "killed"
            if os.environ.get("MUTANTS_DEBUG"):
                print(result.stdout[-1500:], file=sys.stderr)
        except subprocess.TimeoutExpired:  # undecided, not killed: a slow machine must not flatter the suite
            outcome = "timeout"
        return outcome, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated parts of mutant names to run")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per mutant's test run")
    parser.add_argument(
        "--project", type=Path, default=ROOT, help="the checkout to mutate, with its own tests (default: this one)"
    )
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.only or any(part in m[0] for part in args.only.split(","))]
    if args.list:
        print("\n".join(m[0] + ("  (equivalent)" if len(m) > 3 else "") for m in chosen))
        return
    source = (args.project / "gan_mnist.py").read_text()
    started = time.perf_counter()
    results = {}
    for mutant in chosen:
        name, old, new = mutant[:3]
        outcome, seconds = run_mutant(args.project, old, new, source, args.timeout)
        results[name] = {"outcome": outcome, "seconds": round(seconds, 1)}
        if len(mutant) > 3:
            results[name]["equivalent"] = mutant[3]
        print(f"{name}: {outcome} ({seconds:.0f}s)", file=sys.stderr, flush=True)
    counted = [n for n, r in results.items() if "equivalent" not in r and r["outcome"] in ("killed", "survived")]
    killed = [n for n in counted if results[n]["outcome"] == "killed"]
    stale = [n for n, r in results.items() if r["outcome"].startswith("stale")]
    undecided = [n for n, r in results.items() if r["outcome"] == "timeout"]
    print(
        json.dumps(
            {
                "mutants": len(counted),
                "killed": len(killed),
                "kill_rate": round(len(killed) / len(counted), 3) if counted else None,
                "survivors": [n for n in counted if n not in killed],
                "equivalent": {n: results[n]["outcome"] for n, r in results.items() if "equivalent" in r},
                "stale": stale,
                "timeout": undecided,
                "seconds": round(time.perf_counter() - started, 1),
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
