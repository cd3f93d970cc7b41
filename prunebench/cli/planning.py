"""``prunebench plan-episodes``: how many episodes a strategy-vs-dense comparison needs."""

from __future__ import annotations

from prunebench.contract.errors import PrunebenchError


def _check(args) -> None:
    """One line naming the flag at fault."""
    from prunebench.evaluation.planning import discordance_range

    if not 0 < args.baseline < 1:
        raise PrunebenchError(f"--baseline: a success rate strictly between 0 and 1, got {args.baseline}")
    if not 0 < args.drop < args.baseline:
        raise PrunebenchError(f"--drop: a fraction above 0 and below --baseline ({args.baseline}), got {args.drop}")
    for flag, value in (("--alpha", args.alpha), ("--power", args.power)):
        if not 0 < value < 1:
            raise PrunebenchError(f"{flag}: strictly between 0 and 1, got {value}")
    low, high = discordance_range(args.baseline, args.drop)
    if args.discordant is not None and not low <= args.discordant <= high:
        raise PrunebenchError(f"--discordant: with --baseline {args.baseline} and --drop {args.drop} it lies in "
                              f"[{low:.3g}, {high:.3g}], got {args.discordant}")


def cmd_plan_episodes(args) -> int:
    from prunebench.evaluation import planning

    _check(args)
    baseline, drop = args.baseline, args.drop
    f = args.discordant if args.discordant is not None else planning.independent_discordance(baseline, drop)
    try:
        n = planning.episodes_for_power(baseline, drop, args.alpha, args.power, args.discordant)
    except ValueError as err:
        raise PrunebenchError(f"--drop: {drop} is too small to detect: {err}") from None
    assumed = "given" if args.discordant is not None else "as if independent: conservative"
    print(f"dense success {baseline:.2f}, strategy {baseline - drop:.2f} (a drop of {100 * drop:.1f} points), "
          f"runs differing on {100 * f:.1f}% of episodes ({assumed})")
    reached = planning.mcnemar_power(n, baseline, drop, args.alpha, args.discordant)
    print(f"McNemar exact test, two-sided alpha {args.alpha:g}, power {args.power:g}: {n} episodes per strategy, "
          f"the same as dense's (power {reached:.3f})")
    print(f"Wilson 95% interval of ±10 points at success {baseline:.2f}: "
          f"{planning.episodes_for_wilson(baseline, 0.10)} episodes")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("plan-episodes", help="episodes per strategy needed to detect a drop in success vs dense")
    p.add_argument("--baseline", type=float, required=True, metavar="P",
                   help="dense success rate, a fraction in (0, 1)")
    p.add_argument("--drop", type=float, required=True, metavar="D",
                   help="the drop in success rate to detect, a fraction (0.1 = 10 points)")
    p.add_argument("--alpha", type=float, default=0.05, help="two-sided level of the test (default 0.05)")
    p.add_argument("--power", type=float, default=0.8, help="power wanted (default 0.8)")
    p.add_argument("--discordant", type=float, metavar="F",
                   help="expected share of episodes where the strategy and dense differ (one succeeds, the "
                        "other fails); default: as if the runs were independent, which overstates it for "
                        "paired runs and so asks for more episodes")
    p.set_defaults(func=cmd_plan_episodes)
