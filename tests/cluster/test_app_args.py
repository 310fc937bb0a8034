"""The Serve application's arguments, checked where Serve builds the app (before any replica starts): random weights
name a shape and bring their own checkpoint and model name; replica counts reach the ingress deployment."""

from __future__ import annotations

import pytest
from ray import serve

from cluster.serve import build_app, ingress_app


def test_random_weights_of_a_preset_build_an_app():
    assert isinstance(build_app({"placement": "p.yaml", "random_weights": "mixtral-8x7b"}), serve.Application)
    app = build_app({"placement": "p.yaml", "random_weights": "mixtral-8x7b", "max_model_len": 1024})
    assert isinstance(app, serve.Application)


@pytest.mark.parametrize(
    "args,message",
    [
        ({"random_weights": "mixtral-9x9b"}, "random_weights: unknown shape 'mixtral-9x9b'; choose one of"),
        ({"random_weights": "mixtral-8x7b", "checkpoint": "/models/x"}, "checkpoint cannot be given with random"),
        ({"random_weights": "mixtral-8x7b", "model_name": "mixtral"}, "served as 'random-mixtral-8x7b'"),
        ({"random_weights": "mixtral-8x7b", "max_model_len": 0}, "max_model_len: expected an integer of 2 or more"),
        ({"max_model_len": 1024}, "max_model_len goes with random_weights"),
    ],
)
def test_random_weights_args_that_cannot_hold_are_refused_by_name(args, message):
    with pytest.raises(ValueError, match=message):
        build_app({"placement": "p.yaml", **args})


def test_replica_options_reach_the_ingress_deployment():
    app = ingress_app({"placement": "p.yaml"}, num_replicas=3)
    assert app._bound_deployment.num_replicas == 3
    scaled = ingress_app({"placement": "p.yaml"}, autoscaling_config={"min_replicas": 1, "max_replicas": 4})
    assert scaled._bound_deployment._deployment_config.autoscaling_config.max_replicas == 4
