"""ray_jobs: the `bae` command line and thin Ray entrypoints around bae_core."""
