"""Config overrides that make the shipped configs test-sized (shared by the test modules)."""

SMALL = [
    "sampler.num_steps=3",
    "sampler.eval_num_steps=3",
    "data.prompts_per_step=2",
    "learner.minibatch_size=4",
    "logging.progress_bar=false",
    "logging.sample_every=0",
    "checkpoint.every=0",
    "logging.eval_per_category=0",
]
# The roles' reservations shrunk so that every role fits a 4-CPU local cluster.
RAY_SMALL = [
    *SMALL,
    "torch_threads=1",
    "ray.worker_cpus=0.5",
    "ray.learner_cpus=0.5",
    "ray.reward_serving.num_cpus=0.1",
]
