"""The keys passes write into ``node.meta`` and ``GraphModule.meta``, declared once."""

# node.meta
LABELS = "fxsearch.labels"          # channel labels of the node's value (see passes/channel_groups.py)
NONNEG = "fxsearch.nonneg"          # True when the value is known to be >= 0 (ReLU-like producers)
RANGE = "fxsearch.range"            # (min, max) of the value on the example inputs
ROLE = "fxsearch.role"              # "weight_search", "act_search", "choice" for inserted nodes
GROUP = "fxsearch.group"            # group id of a searchable layer
ABSORBED_RELU = "fxsearch.absorbed_relu"  # on a q_ node: the ReLU it stands for (passes/absorb_relu.py)

# GraphModule.meta
ANALYSIS = "fxsearch.channel_analysis"  # ChannelAnalysis written by the channel-group pass
COST_LAYERS = "fxsearch.cost_layers"    # list[LayerSpec] written by the cost pass (passes/cost.py)
COST_MODELS = "fxsearch.cost_models"    # dict name -> CostModel priced by SearchModel.cost (first = main)
CHECKPOINT = "fxsearch.checkpoint"      # what fxsearch.load read: model_ref, model_kwargs, inputs, extra
SORT_RESULT = "fxsearch.channel_sort"    # SortResult written by passes/sort_channels.py (packed export)
