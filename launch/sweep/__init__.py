"""The recipe lab: many short proxy runs of the real base trainer from a menu of knobs, ranked by
validation bits per byte, the finalists stressed with longer runs, everything in an append-only
`trajectory.jsonl` (see docs/recipe-lab.md). `launch.sweep.cli` is the command line."""
