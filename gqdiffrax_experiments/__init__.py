"""The experiments of Norcliffe & Deisenroth (TMLR 2023) and the gradient benchmarks,
run on gqdiffrax: `python -m gqdiffrax_experiments --help`.

Not part of the library: it needs the `experiments` extra (`pip install
"gqdiffrax[experiments]"`: optax, matplotlib, tqdm, scikit-learn), and
`import gqdiffrax` never imports it."""
