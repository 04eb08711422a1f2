"""python -m flexq_jax.tuning --from RUN.json ... --out TABLE.json (see flexq_jax/tuning/__init__.py)."""

from flexq_jax.tuning import main

main()
