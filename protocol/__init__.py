"""The paper's protocol as a pipeline of script runs (reproduce.py is its command line).

arms      the arms of the comparison (a method, a network, real or synthetic unlabeled images)
options   reproduce.py's parsed options completed and checked (presets, arms, pass-through flags)
plan      every stage of the protocol (the scripts' commands, what each reads) and the scripts' settings
estimate  each pending stage's expected time
ledger    stages.json: which stages are done, resume, or stale; running stages one after another
parallel  stages side by side on one node (--jobs N)
cluster   stages as SLURM jobs through submitit (--launcher slurm)
runner    one stage alone (--stage), job submission, the closing time table
results   the results table, results.png and results_curves.png
report    a protocol folder's results.csv, times.csv, results.md and figures
"""
