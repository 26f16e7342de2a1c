"""OpenAI-compatible LLM client shared by the data engine, synthetic data and the judge.

    from duetgen.llm import LLMClient, PromptTemplate
    client = LLMClient("http://127.0.0.1:8000/v1", "Qwen2.5-VL-7B-Instruct", cache_path="llm_cache.sqlite")
    t = PromptTemplate.load("example_json")
    r = client.chat(t.render(question="..."), **t.chat_kwargs())
    if r.ok: print(r.data)
"""

from duetgen.llm.cache import ResponseCache
from duetgen.llm.client import ChatResult, LLMClient
from duetgen.llm.templates import PromptTemplate, TemplateError

__all__ = ["ChatResult", "LLMClient", "PromptTemplate", "ResponseCache", "TemplateError"]
