"""Benchmark: scoring 1,000 DIPG responses against a 30-statement context.

Target: under 2 s on a 2-core CPU, so the reward never slows a GRPO step or an
evaluation.  The cost is in grounding: a proof that is not an exact quote is
compared sentence by sentence with the context by difflib.  rewards.py builds
difflib's index of a context once (`_context_matcher`) and skips exact ratios
whose upper bounds already fail (`_ratio_at_least`), without changing a result;
`--package` times the package itself on the same responses and checks that
every reward is identical.  YAML is parsed by PyYAML in pure Python, like the
package, and is the slowest format.

    python bench_rewards.py [--n 1000] [--seed 0] [--package]
"""

import argparse
import random
import time

import rewards as R
import stats

MARKERS = ["H3 K27M", "ACVR1", "ATRX", "TP53", "PIK3CA", "PDGFRA"]
DRUGS = ["ONC201", "panobinostat", "everolimus", "bevacizumab", "temozolomide", "nimotuzumab"]
MODALITIES = ["re-irradiation", "convection-enhanced delivery", "proton therapy", "hypofractionated radiotherapy"]
TEMPLATES = [
    "In a cohort of {n} children, {drug} was associated with a median survival of {m} months.",
    "The {marker} mutation was found in {p}% of biopsied DIPG tumors in the registry.",
    "Source {src} reports that {drug} {verb} progression-free survival in patients with {marker} tumors.",
    "{modality} to {gy} Gy was well tolerated, with grade 3 toxicity in {p}% of patients.",
    "Patients treated with {drug} after {modality} had a radiographic response rate of {p}%.",
]


def make_context(rng, n_statements=30):
    def fill(template):
        return template.format(n=rng.randint(12, 300), drug=rng.choice(DRUGS), m=rng.randint(8, 24),
                               marker=rng.choice(MARKERS), p=rng.randint(3, 80), src="ABCD"[rng.randint(0, 3)],
                               verb=rng.choice(["extended", "did not extend"]), modality=rng.choice(MODALITIES),
                               gy=rng.choice([20, 24, 30, 39, 54]))
    return [fill(rng.choice(TEMPLATES)) for _ in range(n_statements)]


def near_miss(rng, sentence):
    words = sentence.split()
    i = rng.randrange(len(words))
    edits = [lambda w: w[:-1], lambda w: w.upper(), lambda w: w + "s", lambda w: "the " + w]
    words[i] = rng.choice(edits)(words[i])
    return " ".join(words)


def make_responses(rng, statements, n, form="xml"):
    """A third each: exact quotes, near-miss paraphrases, ungrounded text, in one format
    ("xml" as the SFT model writes, "json", "yaml") or "mixed" (a third each)."""
    ungrounded = ["Aspirin was shown to cure DIPG in a large randomized trial of adults.",
                  "The tumor usually responds completely to surgery alone within three weeks.",
                  "Most patients are cured by high-dose vitamin therapy according to recent data."]
    out = []
    for i in range(n):
        kind = i % 3
        picked = rng.sample(statements, rng.randint(1, 3))
        if kind == 0:
            proof = " ".join(picked)
        elif kind == 1:
            proof = "I will now extract the relevant evidence. " + " ".join(near_miss(rng, s) for s in picked)
        else:
            proof = " ".join(rng.sample(ungrounded, 2))
        think = "The question asks about the evidence. " * rng.randint(2, 8)
        final = rng.choice([picked[0], "The provided context does not contain this information.",
                            "Treatment was well tolerated."])
        this = ["xml", "json", "yaml"][rng.randrange(3)] if form == "mixed" else form
        if this == "xml":
            out.append(f"<think>{think}</think>\n<proof>{proof}</proof>\n<answer>{final}</answer>")
        elif this == "json":
            out.append('{"analysis": "%s", "proof": "%s", "final": "%s"}' % (think, proof, final))
        else:
            out.append(f"analysis: {think}\nproof: {proof}\nfinal: {final}")
    return out


def best_time(fn, repeats):
    """Best of a few runs (wall and CPU seconds): other processes on a small
    machine only ever add time; CPU time shows what the scoring itself costs."""
    walls, cpus = [], []
    for _ in range(repeats):
        R._context_matcher.cache_clear()
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus), result


def package_scorer():
    """The package's own train-path scoring, when it is installed (test-only dependency)."""
    try:
        import dataclasses
        from med_safety_gym.dipg_environment import DIPGEnvironment
        from med_safety_gym.format_parser import FormatParser, ResponseFormat
        from datasets import Dataset
    except ImportError:
        return None
    row = [{"role": "user", "content": "<context>c</context><question>q</question>"},
           {"role": "assistant", "content": "a"}]
    env = DIPGEnvironment(dataset_path="unused", dataset=Dataset.from_dict({"messages": [row]}),
                          **dataclasses.asdict(R.PENALTIES["soft"]))
    parser = FormatParser()

    def score(response, context, gold):
        try:
            return env.calculate_total_reward_from_parsed(parser.parse(response, ResponseFormat.AUTO),
                                                          context, {"final": gold})[0]
        except Exception:
            return -15.0
    return score


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="number of responses")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="report the best of this many runs")
    parser.add_argument("--package", action="store_true",
                        help="also time openenv-dipg-safety itself and check equal rewards (slow import)")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    statements = make_context(rng)
    context = " ".join(statements)
    gold = f"<answer>{statements[0]}</answer>"
    soft = R.PENALTIES["soft"]
    print(f"context: {len(statements)} statements, {len(context)} characters")

    reference = package_scorer() if args.package else None
    for form in ("xml", "json", "yaml", "mixed"):
        responses = make_responses(random.Random(args.seed + 1), statements, args.n, form)
        for mode in ("train", "eval"):
            wall, cpu, scored = best_time(lambda: [R.score_dipg(r, context, gold, soft, mode) for r in responses],
                                          args.repeats)
            line = f"{form:5s} {mode:5s}: {wall:.3f} s ({cpu:.3f} s CPU) for {len(responses)} responses"
            if mode == "eval":
                s = stats.summarize(scored)
                line += (f"  (mean reward {s['mean_reward']:.2f}, hallucination "
                         f"{s['medical_hallucination_rate']:.2f}, safe {s['safe_response_rate']:.2f})")
            print(line)
        if reference is not None:
            wall, cpu, theirs = best_time(lambda: [reference(r, context, gold) for r in responses], 1)
            ours = [R.score_dipg(r, context, gold, soft, "train")[0] for r in responses]
            assert ours == theirs, "rewards differ from openenv-dipg-safety"
            print(f"{form:5s} openenv-dipg-safety 0.1.18 itself: {wall:.3f} s ({cpu:.3f} s CPU), identical rewards")


if __name__ == "__main__":
    main()
