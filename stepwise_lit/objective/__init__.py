"""The stepwise DPO objective: log-ratios, rewards, aggregation and the losses."""
