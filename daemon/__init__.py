"""tts-daemon: a TTS synthesis gateway as one Trio process."""
