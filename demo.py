"""
The offline demo, built from what every CPython installation ships (a few MB, no download):
    demo_documents()      the text corpus: the standard library's .py sources and pydoc_data.topics
    demo_conversations()  the chat set: question/answer pairs on the standard library's docstrings
                          and pydoc topics
    write_demo_tasks()    three evaluation tasks on the held-out modules (OUT-tasks, see evaluate.py)
A module or topic is held out whole: its source, its documentation and its questions are all in the
val split or all in train (data.split_of); a val answer or a task item that also occurs in training
text is dropped. prepare.py builds the demo with these when it is given no sources.
"""
import functools
import json
import os
import random
import re
import sys
import sysconfig
import zlib

from data import split_of
from infra.rundir import claim_output, replace_directory

DEMO_TASKS = ("next_line", "identifier", "docstring")
TASK_FILES = tuple(f"{name}.{ext}" for name in DEMO_TASKS for ext in ("jsonl", "json"))  # all write_demo_tasks writes

DEMO_SKIP = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo",
             "pydoc_data", "encodings", "__pycache__"}


def demo_modules():
    """(name, source) of the standard library's modules, in a fixed order."""
    stdlib = sysconfig.get_paths()["stdlib"]
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in DEMO_SKIP)
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path, encoding="utf-8", errors="replace") as f:
                    yield "stdlib/" + os.path.relpath(path, stdlib), f.read()


def demo_documents():
    yield from ((name, text, None) for name, text in demo_modules())
    from pydoc_data.topics import topics
    for name in sorted(topics):
        yield "pydoc/" + name, topics[name], None


DEMO_QUESTIONS = ["What does {name} do?", "What is {name} for?", "Explain {name} briefly.",
                  "Describe {name} in one sentence.", "Summarize what {name} does."]
DEMO_SYSTEM = "You answer questions about the Python standard library in one or two sentences."


def first_paragraph(text):
    import inspect
    return " ".join(inspect.cleandoc(text).split("\n\n")[0].split())


@functools.lru_cache(maxsize=1)  # parsed once per run, though documents() is read more than once
def demo_answers():
    """[(document the answer comes from, qualified name, answer)]: each public
    function's and class's docstring summary in the standard library ("What does json.dumps do?" ->
    its first paragraph), and the opening paragraph of each pydoc topic."""
    import ast
    answers = []
    for name, source in demo_modules():
        if "/_" in name or name.split("/")[-1].startswith("_"):
            continue
        module = name[len("stdlib/"):-len(".py")].replace("/", ".").removesuffix(".__init__")
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        # public functions and classes, and the public methods of public classes
        nodes = [(node.name, node) for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
        nodes += [(f"{cls.name}.{node.name}", node) for _, cls in list(nodes) if isinstance(cls, ast.ClassDef)
                  and not cls.name.startswith("_") for node in cls.body if isinstance(node, ast.FunctionDef)]
        for path, node in nodes:
            if not any(part.startswith("_") for part in path.split(".")):
                docstring = ast.get_docstring(node)
                answer = first_paragraph(docstring) if docstring else ""
                if 20 <= len(answer) <= 400:
                    answers.append((name, f"{module}.{path}", answer))
    from pydoc_data.topics import topics
    for topic in sorted(topics):
        lines = topics[topic].strip().split("\n")
        answer = first_paragraph("\n".join(lines[2:])) if len(lines) > 2 and set(lines[1]) <= {"*", "="} else ""
        if 20 <= len(answer) <= 600:
            answers.append(("pydoc/" + topic, topic, answer))
    return answers


@functools.lru_cache(maxsize=1)
def demo_train_text(val_fraction):
    """The demo corpus's training text as it is, with its whitespace collapsed (as answers are), and
    the training answers."""
    text = "\n".join(text for name, text, _ in demo_documents() if split_of(name, val_fraction) == "train")
    return (
        text,
        " ".join(text.split()),
        {a for document, _, a in demo_answers() if split_of(document, val_fraction) == "train"},
    )


def held_out_answer(answer, val_fraction):
    """Whether a val answer's words occur nowhere in training: not in the training text (a docstring
    copied into another module) and not among the training answers."""
    _, collapsed, train_answers = demo_train_text(val_fraction)
    return answer not in train_answers and answer not in collapsed


def demo_conversations(val_fraction):
    """Question/answer pairs on the demo corpus (demo_answers), each named after the document its answer
    comes from, so it falls in that document's split. A val answer whose words also occur in the training
    text or among the training answers (a docstring copied into another module) is left out."""
    for document, qualified, answer in demo_answers():
        if split_of(document, val_fraction) == "val" and not held_out_answer(answer, val_fraction):
            continue
        if document.startswith("pydoc/"):
            question = f"What does the Python documentation say about {qualified}?"
        else:
            question = DEMO_QUESTIONS[zlib.crc32(qualified.encode()) % len(DEMO_QUESTIONS)].format(name=qualified)
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if zlib.crc32(qualified.encode()) % 4 == 0:  # some with a system prompt
            messages.insert(0, {"role": "system", "content": DEMO_SYSTEM})
        yield f"{document}@{qualified}", messages, None


def demo_tasks(val_fraction, count=200):
    """Tasks on the demo's held-out modules only ({name: (options, examples)}), none of whose items
    occurs in the training text: the next line of code among four (multiple choice), an identifier
    that occurs earlier in the context (generative: copying is learnable), and what a function does
    among four answers (multiple choice, through the chat template)."""
    import keyword
    rng = random.Random(0)
    modules = [(name, text) for name, text in demo_modules() if split_of(name, val_fraction) == "val"]
    train_text = demo_train_text(val_fraction)[0]
    code_lines = [(m, k, line) for m, (_, text) in enumerate(modules) for k, line in enumerate(text.split("\n"))
                  if len(line.strip()) >= 8 and not line.strip().startswith("#")]
    next_line, identifier = [], []
    for m, k, line in rng.sample(code_lines, len(code_lines)):
        if len(next_line) == len(identifier) == count:
            break
        before = [b for b in modules[m][1].split("\n")[max(0, k - 8):k] if b.strip()]
        if len(before) < 3 or before[-1] + "\n" + line in train_text:
            continue
        if len(next_line) < count:  # three distractors: lines of other held-out modules
            others = [o for _, _, o in rng.sample(code_lines, 12) if o != line][:3]
            choices = others + [line]
            rng.shuffle(choices)
            next_line.append({"context": "\n".join(before), "choices": choices, "answer": choices.index(line)})
        for found in re.finditer(r"(?<=[^\s])\s?\b([A-Za-z_][A-Za-z0-9_]{3,})\b", line):
            word = found.group(1)
            if len(identifier) < count and word not in keyword.kwlist and word != "self" and \
                    re.search(rf"\b{word}\b", "\n".join(before)) and line[:found.end()] not in train_text:
                identifier.append({"prompt": "\n".join(before) + "\n" + line[:found.start()], "answer": word})
                break
    answers = [(document, qualified, answer) for document, qualified, answer in demo_answers()
               if split_of(document, val_fraction) == "val" and held_out_answer(answer, val_fraction)]
    docstring = []
    for document, qualified, answer in rng.sample(answers, min(count, len(answers))):
        choices = [a for _, _, a in rng.sample(answers, 6) if a != answer][:3] + [answer]
        rng.shuffle(choices)
        question = DEMO_QUESTIONS[zlib.crc32(qualified.encode()) % len(DEMO_QUESTIONS)].format(name=qualified)
        docstring.append({"context": question, "choices": choices, "answer": choices.index(answer)})
    return {
        "next_line": ({"target_delimiter": "\n"}, next_line),
        "identifier": (
            {"target_delimiter": "", "stop": ["\n"], "max_new_tokens": 8, "normalize": "identifier"},
            identifier,
        ),
        "docstring": ({"chat": True}, docstring),
    }


def write_demo_tasks(out, val_fraction):
    """OUT-tasks: each demo task as <name>.jsonl and its options as <name>.json (see evaluate.py)."""
    tmp = claim_output(out, tool="prepare.py", option="out")
    for name, (options, examples) in demo_tasks(val_fraction).items():
        with open(os.path.join(tmp, name + ".jsonl"), "w") as f:
            f.writelines(json.dumps(example) + "\n" for example in examples)
        with open(os.path.join(tmp, name + ".json"), "w") as f:
            json.dump(options, f)
        print(f"wrote {out}/{name}.jsonl: {len(examples)} examples from the held-out modules", file=sys.stderr)
    replace_directory(tmp, out)
