"""The gateway benchmark (docs/architecture.md §9): `python -m bench.run [--quick]`, or
`make bench`.

Every figure is measured against a bare aiohttp pass-through proxy run side by side on the same
machine in the same run, and reported as a ratio; absolute numbers are printed too, marked as
noisy. See bench/README.md.
"""
