"""``wearfl privacy``: the epsilon that noisy rounds spend, and the noise that a target epsilon needs."""

from __future__ import annotations

import argparse
import json
from typing import Any

from hub.commands import add_command_group

__all__ = ["add_privacy_command"]

# hub.accounting (and dp_accounting, ~1 s to import) is loaded inside the handlers: every
# `wearfl` command builds this parser.


def add_privacy_command(sub: Any) -> None:
    """Register ``privacy epsilon`` and ``privacy noise``."""
    psub = add_command_group(sub, "privacy",
                             help="differential-privacy accounting: epsilon from noise, noise from epsilon",
                             description="Client-level differential privacy of sampled Gaussian rounds, accounted "
                                         "with dp_accounting (RDP or PLD).")

    eps = psub.add_parser("epsilon", help="the epsilon spent by T rounds of noise multiplier Z",
                          description="The (epsilon, delta) that T rounds spend when each adds Gaussian noise of "
                                      "Z times the clipping norm and samples clients at rate Q.")
    eps.add_argument("--noise", type=float, required=True, metavar="Z",
                     help="noise multiplier: noise standard deviation over the clipping norm")
    _add_common(eps)
    eps.set_defaults(func=cmd_privacy_epsilon)

    noise = psub.add_parser("noise", help="the smallest noise multiplier that keeps T rounds within epsilon E",
                            description="Solve for the smallest noise multiplier Z whose T rounds spend at most "
                                        "epsilon E (to about 0.1 %%).")
    noise.add_argument("--epsilon", type=float, required=True, metavar="E", help="the target epsilon")
    _add_common(noise)
    noise.set_defaults(func=cmd_privacy_noise)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sample-rate", type=float, required=True, metavar="Q",
                   help="fraction of clients in a round (Poisson: each client's probability; fixed: m/n)")
    p.add_argument("--rounds", type=int, required=True, metavar="T", help="number of released rounds")
    p.add_argument("--delta", type=float, required=True, metavar="D", help="delta, below 1/population (e.g. 1e-5)")
    p.add_argument("--accountant", choices=("rdp", "pld"), default="rdp",
                   help="rdp (default; fast, a little loose) or pld (tighter, slower)")
    p.add_argument("--sampling", choices=("poisson", "fixed"), default="poisson",
                   help="poisson (default): each client joins independently; fixed: exactly m of n clients "
                        "without replacement (needs --population, rdp only)")
    p.add_argument("--population", type=int, metavar="N", help="number of clients n (for --sampling fixed)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_privacy_epsilon(args: argparse.Namespace) -> int:
    from hub.accounting import PrivacyAccountant

    accountant = PrivacyAccountant(args.noise, args.delta, sample_rate=args.sample_rate, population=args.population,
                                   accountant=args.accountant, sampling=args.sampling)
    report = accountant.report(args.rounds)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"epsilon = {report['epsilon']:.4g} at delta = {report['delta']:g} after {args.rounds} rounds with noise "
          f"multiplier {report['noise_multiplier']:g} ({args.accountant.upper()} accountant); "
          f"assumes {report['sampling']}")
    return 0


def cmd_privacy_noise(args: argparse.Namespace) -> int:
    from hub.accounting import describe_sampling, epsilon, noise_for_epsilon

    z = noise_for_epsilon(args.epsilon, args.sample_rate, args.rounds, args.delta, args.accountant, args.sampling,
                          args.population)
    population = args.population if args.sampling == "fixed" else None
    spent = epsilon(z, args.sample_rate, args.rounds, args.delta, args.accountant, args.sampling, population)
    sampling = describe_sampling(args.sampling, args.sample_rate, population)
    if args.json:
        print(json.dumps({
            "noise": z, "target_epsilon": args.epsilon, "epsilon": spent, "delta": args.delta,
            "sample_rate": args.sample_rate, "rounds": args.rounds, "accountant": args.accountant,
            "sampling": sampling, "sampling_scheme": args.sampling, "population": population,
        }, indent=2))
        return 0
    print(f"noise multiplier {z:.4g} keeps epsilon <= {args.epsilon:g} at delta = {args.delta:g} over {args.rounds} "
          f"rounds (it spends {spent:.4g}, {args.accountant.upper()} accountant); assumes {sampling}")
    return 0
