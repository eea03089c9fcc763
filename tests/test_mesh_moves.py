"""A trainer given a mesh other than the one its model was loaded on moves the params there."""

import numpy as np
import pytest

import jaxsft
from jaxsft.models.hf_io import hf_state_dict
from tiny import tiny_torch_model


@pytest.mark.slow
def test_trainer_moves_params_to_its_mesh_and_trains_like_one_device():
    torch_model = tiny_torch_model("llama")
    rng = np.random.default_rng(0)
    calls = [[rng.integers(3, 300, rng.integers(5, 30)) for _ in range(8)] for _ in range(2)]
    results = []
    for mesh, per_device in ((jaxsft.single_device_mesh(), 8), (jaxsft.make_mesh(2, 2, 2), 2)):
        model = jaxsft.from_pretrained(torch_model, mesh=jaxsft.single_device_mesh())
        config = jaxsft.TrainConfig(learning_rate=1e-3, per_device_train_batch_size=per_device, max_steps=10,
                                    max_length=32, logging_steps=0, disable_tqdm=True)
        trainer = jaxsft.IterativeSFTTrainer(model, config, mesh=mesh)
        assert trainer.params["layers"]["q_proj"][...].sharding.mesh.shape == dict(mesh.shape)
        losses = [loss for ids in calls for loss in trainer.step(input_ids=ids)["update_losses"]]
        results.append((losses, hf_state_dict(trainer.model)))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5)
    for key, value in results[0][1].items():
        got = np.asarray(results[1][1][key])
        # Per tensor within 1e-5 in norm; element-wise within 5 % of one Adam step (lr 1e-3): Adam turns
        # float-rounding differences of near-zero gradients into element-wise noise of up to a step.
        assert np.linalg.norm(got - value) <= 1e-5 * np.linalg.norm(value), key
        np.testing.assert_allclose(got, value, rtol=1e-5, atol=5e-5, err_msg=key)
