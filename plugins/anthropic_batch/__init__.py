"""anthropic_batch: run large LLM workloads through the Anthropic Message Batches API from Airflow.

Half the price of the synchronous API in exchange for up to 24 hours of latency. See README.md.
"""

__version__ = "0.1.0"
