"""Bring your own Flax nnx model: train an MLP classifier, then patch its hidden neurons.

Not a language model: the inputs are feature vectors, the outputs class scores, and the metric is
a function of the outputs (the log-probability of each example's true class) written by you.
Denoising patches hidden neurons of a clean example (class ``c``) into the run on another class's
example: which neurons carry the evidence for ``c``? Attribution patching estimates all of them
from one backward pass; the last layer's scores are linear in the head's output, so there AtP is
exact.

Every submodule output is a site named by its attribute path (``linear1``, ``linear2``, ``head``).
Needs ``pip install "jaxpatch[byo]"``.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxpatch

N_IN, HIDDEN, CLASSES = 8, 16, 4


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.linear1 = nnx.Linear(N_IN, HIDDEN, rngs=rngs)
        self.linear2 = nnx.Linear(HIDDEN, HIDDEN, rngs=rngs)
        self.head = nnx.Linear(HIDDEN, CLASSES, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.linear2(nnx.relu(self.linear1(x)))))


CENTRES = 2.0 * jax.random.normal(jax.random.PRNGKey(42), (CLASSES, N_IN))


def data(key, n):
    k1, k2 = jax.random.split(key)
    y = jax.random.randint(k1, (n,), 0, CLASSES)
    return CENTRES[y] + jax.random.normal(k2, (n, N_IN)), y


def train(steps=150, seed=0):
    model = MLP(nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    opt = optax.adam(1e-2)
    state = opt.init(params)

    def step(carry, key):
        params, state = carry
        x, y = data(key, 128)

        def loss(p):
            logits = nnx.merge(graphdef, p)(x)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1))

        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), value

    keys = jax.random.split(jax.random.PRNGKey(seed + 1), steps)
    (params, state), losses = jax.jit(lambda c, k: jax.lax.scan(step, c, k))((params, state), keys)  # one program
    value = losses[-1]
    return nnx.merge(graphdef, params), float(value)


def main():
    t0 = time.perf_counter()
    model, loss = train()
    x, y = data(jax.random.PRNGKey(5), 512)
    acc = float(jnp.mean(jnp.argmax(model(x), -1) == y))
    print(f"trained in {time.perf_counter() - t0:.1f}s: loss {loss:.3f}, accuracy {acc:.2f}")

    patchable = jaxpatch.byo.from_nnx(model, axes={"linear*": ("batch", "neuron")})
    print("sites:", patchable.sites(x[:2]))
    clean, labels = data(jax.random.PRNGKey(11), 32)
    other = (labels + 1) % CLASSES  # each corrupted example comes from another class
    corrupt = CENTRES[other] + jax.random.normal(jax.random.PRNGKey(12), clean.shape)

    def true_class_logprob(logits):  # a metric of the model's outputs; `labels` is passed as data
        return jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]

    res = jaxpatch.activation_patch(patchable, clean, corrupt, site="linear2", by=("neuron",),
                                    metrics=(true_class_logprob, "logit_diff", "accuracy"), answer=labels, wrong=other)
    print(res)
    print("top neurons (normalised true-class log-prob restored):", res.top(5, "true_class_logprob", normalized=True))
    print("baselines:", res.baselines("accuracy"))

    atp = jaxpatch.attribution_patch(patchable, clean, corrupt, site="linear2", by=("neuron",), metric=true_class_logprob)
    r = np.corrcoef(atp.values(), res.values("true_class_logprob"))[0, 1]
    print(f"AtP vs exact over {HIDDEN} neurons: Pearson r = {r:.3f}")

    exact = jaxpatch.activation_patch(patchable, clean, corrupt, site="head", by=("dim1",), answer=labels, wrong=other)
    est = jaxpatch.attribution_patch(patchable, clean, corrupt, site="head", by=("dim1",), answer=labels, wrong=other)
    err = np.max(np.abs(est.values() - exact.values()))
    print(f"head outputs (logit_diff is linear in them): max |AtP - exact| = {err:.2e}")
    print(f"done in {time.perf_counter() - t0:.1f}s")
    assert acc > 0.9 and err < 1e-4, (acc, err)


if __name__ == "__main__":
    np.set_printoptions(precision=3, suppress=True)
    main()
