"""Analysis on the IR: coupled-dimension groups (`coupling`, `dim_rules`, `channel_atoms`) and the
decoder-LLM recogniser (`llm`) that names attention KV groups and MLP neurons by layer."""
