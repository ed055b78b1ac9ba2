"""Small helpers every layer uses: argument checks that say what to do, chunk sizes, tqdm's switch,
device copies without a host synchronisation. Imports nothing from modeopt."""
