"""`mlx-xglm chat`: the cached transcript, and the session driven through a pseudo-terminal."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys

import pexpect
import pytest
from xglm_fixtures import default_signals

from mlx_xglm import XGLMError, load, make_prompt_cache, stream_generate
from mlx_xglm.decoding.chat import Conversation
from mlx_xglm.tokenization.prompt import chat_prompt_ids

CLI = [sys.executable, "-m", "mlx_xglm.cli"]
STATS = re.compile(rb"\[prompt: (\d+) tokens")


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    model, tokenizer = load(tiny_checkpoint)
    return tiny_checkpoint, model, tokenizer


def turn_ids(tokenizer, message, template="User: {message}\nAssistant:"):
    return tokenizer.encode(template.replace("{message}", message), add_special_tokens=False, newlines="eos")


def test_transcript_is_written_with_eos_between_lines(tiny):
    _, model, tokenizer = tiny
    conversation = Conversation(model, tokenizer)
    list(conversation.reply("Bonjour", max_tokens=5))
    ids = conversation.transcript_ids
    expected_start = [tokenizer.eos_token_id, *turn_ids(tokenizer, "Bonjour")]
    assert ids[: len(expected_start)] == expected_start
    assert ids[-1] == tokenizer.eos_token_id  # the reply's line is closed


def test_second_turn_reads_only_its_new_text(tiny):
    _, model, tokenizer = tiny
    conversation = Conversation(model, tokenizer)
    first = list(conversation.reply("Bonjour", max_tokens=6))
    assert first[-1].prompt_tokens == 1 + len(turn_ids(tokenizer, "Bonjour"))
    before = conversation.transcript_ids
    unread = len(conversation.pending)
    second = list(conversation.reply("How are you?", max_tokens=6))
    assert second[-1].prompt_tokens == unread + len(turn_ids(tokenizer, "How are you?"))
    assert unread <= 1

    # The reply equals the one an uncached run over the whole transcript gives.
    whole = before + turn_ids(tokenizer, "How are you?")
    fresh = list(stream_generate(model, tokenizer, whole, 6, prompt_cache=make_prompt_cache(model)))
    assert [r.token for r in second] == [r.token for r in fresh]


def test_closing_a_reply_early_keeps_it_in_the_transcript(tiny):
    _, model, tokenizer = tiny
    conversation = Conversation(model, tokenizer)
    responses = conversation.reply("Bonjour", max_tokens=50)
    kept = [next(responses).token for _ in range(3)]
    responses.close()
    ids = conversation.transcript_ids
    assert ids[-4:] == [*kept, tokenizer.eos_token_id]
    assert conversation.cache[0].offset == len(conversation.cached)


def test_reset_starts_a_new_document(tiny):
    _, model, tokenizer = tiny
    conversation = Conversation(model, tokenizer, prompt_cache_size=0)
    list(conversation.reply("Bonjour", max_tokens=4))
    conversation.reset()
    again = list(conversation.reply("Bonjour", max_tokens=4))
    assert again[-1].prompt_tokens == 1 + len(turn_ids(tokenizer, "Bonjour"))


def test_a_new_conversation_that_starts_like_a_reset_one_reads_only_the_rest(tiny):
    _, model, tokenizer = tiny
    conversation = Conversation(model, tokenizer)
    first = [r.token for r in conversation.reply("Bonjour", max_tokens=4)]
    conversation.reset()
    again = list(conversation.reply("Bonjour", max_tokens=4))
    assert [r.token for r in again] == first
    assert again[-1].prompt_tokens == 1  # the cached turn, its last token read again
    assert conversation.prefix_cache.hits == 1


def test_bounded_cache_keeps_the_conversation_going(tiny):
    _, model, tokenizer = tiny
    conversation = Conversation(model, tokenizer, max_kv_size=12)
    for message in ["Bonjour", "Encore une fois", "Et puis"]:
        replies = list(conversation.reply(message, max_tokens=6))
        assert replies and replies[-1].finish_reason is not None
        assert conversation.cache[0].offset == len(conversation.cached)


def test_reply_ends_at_the_user_marker(tiny):
    _, model, tokenizer = tiny
    answer = "".join(r.text for r in Conversation(model, tokenizer).reply("Bonjour", max_tokens=12))
    marker = answer[len(answer) // 2 :][:2]
    conversation = Conversation(model, tokenizer)
    conversation.user_marker = marker  # a marker the model is about to write
    text = "".join(r.text for r in conversation.reply("Bonjour", max_tokens=12))
    assert text == answer[: answer.index(marker)]
    reply_ids = tokenizer.encode(text, add_special_tokens=False)
    assert conversation.transcript_ids[-len(reply_ids) - 1 :] == [*reply_ids, tokenizer.eos_token_id]
    assert conversation.cache[0].offset == len(conversation.cached)


def test_template_needs_one_message_placeholder(tiny):
    _, model, tokenizer = tiny
    with pytest.raises(XGLMError, match=r"template must contain \{message\}"):
        Conversation(model, tokenizer, template="Q: A:")


def test_chat_reads_turns_from_a_pipe(tiny, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLX_XGLM_DEBUG"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [*CLI, "chat", "--model", str(tiny[0]), "-m", "4"],
        input=b"Bonjour\n/reset\nEncore\n",
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr  # end of input leaves like Ctrl-D
    assert b"\x1b" not in out.stdout
    assert len(STATS.findall(out.stdout)) == 2 and b"(conversation reset)" in out.stdout


def expected_prompt_counts(model, tokenizer, messages, max_tokens):
    """Prompt tokens of each turn, from the same conversation run in this process."""
    conversation = Conversation(model, tokenizer)
    return [list(conversation.reply(m, max_tokens=max_tokens))[-1].prompt_tokens for m in messages]


@pytest.fixture
def chat(tiny, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLX_XGLM_DEBUG"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TERM="xterm")
    args = ["chat", "--model", str(tiny[0]), "--max-tokens", "8"]
    child = pexpect.spawn(CLI[0], [*CLI[1:], *args], env=env, timeout=60, dimensions=(40, 200))
    child.logfile_read = io.BytesIO()
    child.expect("/help")
    yield child
    child.close(force=True)


def turn(child, message) -> int:
    child.expect_exact("User: ")
    child.sendline(message)
    child.expect(STATS)
    return int(child.match.group(1))


def test_chat_two_turns_reset_and_quit(tiny, chat):
    _, model, tokenizer = tiny
    first, second = expected_prompt_counts(model, tokenizer, ["Bonjour", "Encore"], 8)
    assert turn(chat, "Bonjour") == first
    assert turn(chat, "Encore") == second
    assert second <= 1 + len(turn_ids(tokenizer, "Encore"))  # the first turn was not read again
    chat.expect_exact("User: ")
    chat.sendline("/reset")
    chat.expect_exact("(conversation reset)")
    assert (
        turn(chat, "Bonjour") == 1
    )  # the reset transcript is in the prefix cache: its last token is read again
    chat.expect_exact("User: ")
    chat.sendline("/quit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


@pytest.mark.parametrize("leave", ["q", "ctrl-d"])
def test_chat_quits_with_q_and_ctrl_d(chat, leave):
    chat.expect_exact("User: ")
    if leave == "q":
        chat.sendline("q")
    else:
        chat.sendeof()
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_chat_help_lists_the_commands(chat):
    chat.expect_exact("User: ")
    chat.sendline("/help")
    chat.expect_exact("/reset")
    chat.expect_exact("/quit")


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(tiny, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLX_XGLM_DEBUG"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TERM="xterm")
    args = ["chat", "--model", str(tiny[0]), "--max-tokens", "100000"]
    child = pexpect.spawn(
        CLI[0], [*CLI[1:], *args], env=env, timeout=60, dimensions=(40, 200), preexec_fn=default_signals
    )
    child.expect_exact("User: ")
    child.sendline("Bonjour")
    child.expect(r"Assistant: \S{5}")
    child.kill(signal.SIGINT)
    child.expect(r"\^C\r\n\S*\[prompt: \d+ tokens, [\d.]+ tokens-per-sec \| generation: (\d+) tokens")
    assert 0 < int(child.match.group(1)) < 100000
    child.expect_exact("User: ")  # the chat goes on
    child.kill(signal.SIGINT)  # at the prompt: leave
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130


def test_chat_prompt_ids_write_the_conversation_transcript(tiny):
    _, model, tokenizer = tiny
    eos = tokenizer.eos_token_id
    conversation = Conversation(model, tokenizer)
    conversation.user_marker = ""  # only the end of the line ends the reply
    replies = list(conversation.reply("Bonjour", max_tokens=8))
    generated = [r.token for r in replies]
    assert conversation.transcript_ids == [eos, *turn_ids(tokenizer, "Bonjour"), *generated, eos]
    # Given back as text, the answer is written as its text encodes.
    answer = "".join(r.text for r in replies)
    messages = [("user", "Bonjour"), ("assistant", answer), ("user", "Et puis")]
    assert chat_prompt_ids(tokenizer, messages) == [
        eos,
        *turn_ids(tokenizer, "Bonjour"),
        *tokenizer.encode(answer, add_special_tokens=False),
        eos,
        *turn_ids(tokenizer, "Et puis"),
    ]


def test_chat_prompt_ids_write_a_system_message_as_its_own_line(tiny):
    _, _, tokenizer = tiny
    eos = tokenizer.eos_token_id
    ids = chat_prompt_ids(tokenizer, [("system", "Be brief"), ("user", "Bonjour")], "Q: {message}\nA:")
    system = tokenizer.encode("Be brief", add_special_tokens=False)
    assert ids == [eos, *system, eos, *turn_ids(tokenizer, "Bonjour", "Q: {message}\nA:")]
