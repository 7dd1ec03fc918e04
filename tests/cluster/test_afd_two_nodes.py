"""AFD across two Ray nodes (two raylets on this machine, as Ray's own multi-node tests run): the attention worker
on the node that advertises `afd_attention`, the FFN worker on the one that advertises `afd_ffn`, joined over gloo
(TCP), with greedy tokens equal to the local executor's."""
import ray
from ray.cluster_utils import Cluster

from conftest import make_tiny_model
from afdserve import LLM, SamplingParams

PROMPTS = [[5, 17, 99, 3, 250, 41, 8], list(range(10, 50)), [7]]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def test_attention_and_ffn_workers_on_separate_ray_nodes(tmp_path):
    make_tiny_model(tmp_path, "mixtral", num_local_experts=4, num_experts_per_tok=2)
    expected = [o.outputs[0].token_ids for o in
                LLM(str(tmp_path), dtype="float32").generate(PROMPTS, GREEDY, use_tqdm=False)]
    ray.shutdown()  # this process may hold a private local Ray from other tests
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"afd_attention": 1}})
    ffn_node = cluster.add_node(num_cpus=1, resources={"afd_ffn": 1})
    cluster.wait_for_nodes()
    try:
        llm = LLM(str(tmp_path), dtype="float32", afd="1A1F", afd_transport="gloo", ray_address=cluster.address)
        try:
            executor = llm.engine.core.executor
            attention_node = ray.get(executor.attention[0].node_id.remote())
            assert attention_node == cluster.head_node.node_id
            assert ray.get(executor.ffn[0].node_id.remote()) == ffn_node.node_id != attention_node
            got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
            assert got == expected
        finally:
            llm.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
