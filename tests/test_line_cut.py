"""lineMs: a one-line suggestion cut at a whole word, and the rest of its line decoded after the answer
went out, on the real completion service and the shipped model (a random model rarely writes two words).
The model thread is held where a test needs an order of events that timing alone would not give."""
import asyncio
import threading

import pytest

from codellm.server.model_holder import ModelHolder
from codellm.server.service import CompletionService, Settings

URI = "file:///tmp/work/backup.sh"
PREFIX = '#!/bin/bash\nBACKUP_DIR=/var/backups\nfor f in /etc/*.conf; do\n    cp'


@pytest.fixture(scope="module")
def holder():
    holder = ModelHolder(lambda message, is_error: None)
    holder.configure(None, "cpu", None)
    assert holder.engine is not None, holder.load_error
    yield holder
    holder.stop()


def service_with(holder, **options) -> CompletionService:
    settings = Settings()
    settings.update({"minConfidence": 0, "cutConfidence": 0, "prefetch": "never", **options})
    return CompletionService(holder, settings)


async def model_thread_done(service: CompletionService) -> None:
    """Wait until what is queued on the model thread (a rest of a line included) has run."""
    await asyncio.get_running_loop().run_in_executor(service.executor, lambda: None)


def hold_model_thread(service: CompletionService) -> threading.Event:
    """Queue a job that keeps the model thread busy until the event returned is set."""
    release = threading.Event()
    service.executor.submit(release.wait, 60)
    return release


def whole_line(holder, **options) -> str:
    async def main():
        return (await service_with(holder, lineMs=600_000, **options).suggest(URI, PREFIX, "")).text
    return asyncio.run(main())


def test_the_rest_makes_the_whole_line_the_uncut_run_gives(holder):
    whole = whole_line(holder)
    assert len(whole.split()) >= 2, whole

    async def main():
        service = service_with(holder, lineMs=0)
        part = (await service.suggest(URI, PREFIX, "")).text
        assert whole.startswith(part) and len(part) < len(whole) and whole[len(part)] in " \t"
        await model_thread_done(service)
        again = await service.suggest(URI, PREFIX, "")  # the same place: the cache has the whole line now
        assert (again.source, again.text) == ("cache", whole)
        status = service.status()
        assert (status["lines_cut"], status["line_rests"], status["model_runs"]) == (1, 1, 1)
    asyncio.run(main())


def test_a_part_whose_rest_a_newer_keystroke_stopped_is_not_an_answer_again(holder):
    async def main():
        service = service_with(holder, lineMs=0)
        ask = asyncio.ensure_future(service.suggest(URI, PREFIX, ""))
        await asyncio.sleep(0)  # its model run is queued
        release = hold_model_thread(service)  # between that run and the rest it queues
        part = (await ask).text
        typed = asyncio.ensure_future(service.suggest(URI, PREFIX + "x", ""))  # not the part: a model run
        await asyncio.sleep(0.05)
        release.set()
        await typed
        await model_thread_done(service)
        status = service.status()  # the part's rest gave way to the keystroke (whose own cut answer may have one)
        assert status["line_rests"] == status["lines_cut"] - 1
        back = await service.suggest(URI, PREFIX, "")  # backspace: the part alone is no answer, asked anew
        assert back.source == "model" and back.text.startswith(part)
        assert service.status()["model_runs"] == 3
    asyncio.run(main())


def test_the_rest_keeps_to_the_token_budget(holder):
    short = whole_line(holder, maxTokens=4)

    async def main():
        service = service_with(holder, lineMs=0, maxTokens=4)
        await service.suggest(URI, PREFIX, "")
        await model_thread_done(service)
        return (await service.suggest(URI, PREFIX, "")).text
    assert asyncio.run(main()) == short


def test_a_rest_from_before_a_settings_change_is_not_kept(holder):
    async def main():
        service = service_with(holder, lineMs=0)
        ask = asyncio.ensure_future(service.suggest(URI, PREFIX, ""))
        await asyncio.sleep(0)
        release = hold_model_thread(service)
        part = (await ask).text
        service.clear()  # what a settings change does
        release.set()
        await model_thread_done(service)
        assert service.cache == {} and service.status()["line_rests"] == 0 and part
    asyncio.run(main())


def test_a_popup_takes_no_cut_part_typed_ahead(holder):
    whole = whole_line(holder)

    async def main():
        service = service_with(holder, lineMs=0)
        ask = asyncio.ensure_future(service.suggest(URI, PREFIX, ""))
        await asyncio.sleep(0)
        release = hold_model_thread(service)  # the rest waits: the part is what the cache has
        part = (await ask).text
        typed = asyncio.ensure_future(service.suggest(URI, PREFIX + part[0], "", popup=True))
        await asyncio.sleep(0.05)
        release.set()
        item = await typed
        assert item.source == "model" and item.text == whole[1:]
    asyncio.run(main())


def test_time_waiting_for_the_model_thread_counts_toward_line_ms(holder):
    whole = whole_line(holder)

    async def main():
        service = service_with(holder, lineMs=300)  # far more than the shipped model needs for the line
        release = hold_model_thread(service)
        ask = asyncio.ensure_future(service.suggest(URI, PREFIX, ""))
        await asyncio.sleep(0.4)  # the request waits for the model thread past its lineMs
        release.set()
        part = (await ask).text
        assert whole.startswith(part) and len(part) < len(whole), (part, whole)
        assert service.status()["lines_cut"] == 1
        await model_thread_done(service)
        assert (await service.suggest(URI, PREFIX, "")).text == whole  # the rest came after the answer
    asyncio.run(main())


def test_an_answer_cleaned_away_whole_gives_way_to_the_next_choice(holder):
    prefix = 'last_word()\n{\n    read first rest\n    echo "$rest"\n'  # the model's first choice: a copy of that line
    suffix = "\n\n# Get the value of a key in a desktop file.\nget_key()\n{\n"

    async def main():
        service = service_with(holder, lineMs=600_000, multiline="never")
        got = await service.suggest("file:///tmp/work/words.sh", prefix, suffix)
        assert got.text.strip() and got.text.strip() != 'echo "$rest"', got.text
    asyncio.run(main())


def test_a_line_cut_whose_whole_is_cleaned_away_leaves_no_answer_behind(holder):
    prefix = 'last_word()\n{\n    read first rest\n    echo "$rest"\n'  # the model's first choice: a copy of that line
    suffix = "\n\n# Get the value of a key in a desktop file.\nget_key()\n{\n"
    uri = "file:///tmp/work/words2.sh"

    async def main():
        service = service_with(holder, lineMs=0, multiline="never")
        part = (await service.suggest(uri, prefix, suffix)).text
        assert 'echo "$rest"'.startswith(part.strip()) and part.strip(), part  # a start of the copy went out
        await model_thread_done(service)
        again = await service.suggest(uri, prefix, suffix)  # its rest made it a copy: nothing is kept
        assert (again.source, again.text) == ("cache", "")
    asyncio.run(main())
