"""Speed and memory benchmarks of mechscope.

Run ``python -m mechscope.bench`` to list them, ``python -m mechscope.bench NAME`` to run
one. Every figure is measured in the same run on the same machine (see DESIGN.md, "How
speed is known"): ratios against a reference implementation, and FLOP rates against the
machine's own measured sgemm and FMA peaks. Benchmarks print figures; they assert nothing.
"""
