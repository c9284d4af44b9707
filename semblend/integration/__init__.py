"""Engine adapters. Each subpackage maps one-to-one onto an extra (``semblend[vllm]`` <-> ``integration/vllm``) and
imports its engine lazily; each turns a ``SemanticKvPlan`` into engine-native loads and nothing more."""
